"""Real-vs-generated classification by a generative model: it answers in words, read by a rule."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from vlmopt.tasks.base import Task, aligned

if TYPE_CHECKING:
    from vlmopt.models.base import FamilyAdapter

__all__ = ["REAL_VS_GENERATED_QUESTION", "RealVsGeneratedTask"]

#: What a generative model is asked about an image in the real-vs-generated task.
REAL_VS_GENERATED_QUESTION = "Is this image real or AI-generated?"


class RealVsGeneratedTask(Task):
    """The prompt asks :data:`REAL_VS_GENERATED_QUESTION` (each family words it in its own
    ``real_vs_generated`` prompt); the training target is the row's ``text`` (a labeled dataset,
    :mod:`vlmopt.data.labeling`) or else the bare label statement. Scoring reads the label back
    with :func:`vlmopt.metrics.real_vs_generated.extract_label`. Finetuning uses the task only when
    it is named or the table serves no other task, so adding labels to a captioning set does not
    change what its default finetuning learns.
    """

    name = "real_vs_generated"
    columns = ("label", "label_name")
    default_training = False
    headline = "accuracy"
    headline_label = "real-vs-generated accuracy (%)"
    metrics = ("accuracy", "f1")
    truth_columns = ("label_name",)
    answers_are_classes = True
    judge_rule = "the class read from the generated text (quoted) against the true class"

    def prompts(self, df: pd.DataFrame, adapter: FamilyAdapter) -> list[str]:
        return [adapter.prompt(self.name, REAL_VS_GENERATED_QUESTION)] * len(df)

    def targets(self, df: pd.DataFrame, epoch: int) -> list[str]:
        from vlmopt.data.labeling import check_real_generated_labels, label_text

        if "text" in df.columns:
            return [str(t) for t in df["text"]]
        check_real_generated_labels(df, "the real_vs_generated table")
        return [label_text(int(label)) for label in df["label"]]

    def vocabulary(self) -> list[str]:
        from vlmopt.data.labeling import REASON_QUESTIONS, label_text

        texts = [REAL_VS_GENERATED_QUESTION, *REASON_QUESTIONS.values()]
        return texts + [label_text(label, "caption", "reason") for label in (0, 1)]

    def score(self, predictions: pd.DataFrame, table: pd.DataFrame, *, source: str = "") -> dict[str, float]:
        """Accuracy, per-class precision / recall / F1 and the unparsed share of the answers' classes."""
        from vlmopt.data.labeling import check_real_generated_labels
        from vlmopt.metrics.real_vs_generated import binary_report, extract_label

        data, pred = aligned(predictions, table, source)
        check_real_generated_labels(data, source)
        return binary_report([int(y) for y in data["label"]], [extract_label(pred[sid]) for sid in data.index])

    def answer_key(self, text: str) -> Any:
        """The class the answer states (``"real"``, ``"generated"``) or ``"unparsed"``."""
        from vlmopt.metrics.real_vs_generated import LABEL_NAMES, extract_label

        label = extract_label(text)
        return "unparsed" if label is None else LABEL_NAMES[label]

    def judge(self, text: str, row: pd.Series) -> bool | None:
        return self.answer_key(text) == str(row["label_name"])
