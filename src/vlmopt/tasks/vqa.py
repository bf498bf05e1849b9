"""Visual question answering, and multiple choice (ScienceQA) scored on the same generated answers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from vlmopt.tasks.base import Task, aligned, cell_strings, majority_answer

if TYPE_CHECKING:
    from vlmopt.models.base import FamilyAdapter

__all__ = ["MultipleChoice", "VqaTask"]


class MultipleChoice:
    """Multiple-choice scoring of a VQA table that lists each question's options (ScienceQA).

    Not a task of its own: the model answers the question as in VQA (the options are in the
    prompt's question text), and a table with :attr:`columns` gets these metrics beside VQA's.
    """

    columns = ("choices", "answer_index")
    metrics = ("mc_accuracy",)

    def applies(self, table: pd.DataFrame) -> bool:
        return set(self.columns) <= set(table.columns)

    def score(self, data: pd.DataFrame, pred: dict[str, str], types: dict[str, str]) -> dict[str, float]:
        """The option each answer picks (by letter or by text) against the right one, overall and per type."""
        from vlmopt.metrics import multiple_choice_accuracy

        choices = {sid: list(c) for sid, c in zip(data.index, data["choices"], strict=True)}
        index = {sid: int(i) for sid, i in zip(data.index, data["answer_index"], strict=True)}
        result = multiple_choice_accuracy(pred, choices, index, answer_types=types)
        metrics = {"mc_accuracy": result["overall"]}
        metrics.update({f"mc_accuracy/{t}": v for t, v in result["per_answer_type"].items()})
        metrics["mc_unparsed"] = float(result["n_unparsed"])
        return metrics


class VqaTask(Task):
    name = "vqa"
    columns = ("question", "answers", "answer_type")
    headline = "vqa_accuracy"
    headline_label = "VQA accuracy (%)"
    metrics = ("vqa_accuracy",)
    truth_columns = ("question", "answers")
    judge_rule = "equals the majority human answer after VQA answer normalisation"
    multiple_choice = MultipleChoice()

    def prompts(self, df: pd.DataFrame, adapter: FamilyAdapter) -> list[str]:
        return [adapter.prompt(self.name, q) for q in df["question"]]

    def targets(self, df: pd.DataFrame, epoch: int) -> list[str]:
        # The most frequent annotator answer; ties go to the earliest listed.
        return [majority_answer(list(answers)) for answers in df["answers"]]

    def score(self, predictions: pd.DataFrame, table: pd.DataFrame, *, source: str = "") -> dict[str, float]:
        """Official VQA accuracy (overall and per answer type), exact match, word error rate against
        the majority answer, and the multiple-choice metrics where the table lists options."""
        from vlmopt.metrics import exact_match_accuracy, vqa_accuracy, word_error_rate

        data, pred = aligned(predictions, table, source)
        answers = {sid: list(a) for sid, a in zip(data.index, data["answers"], strict=True)}
        types = dict(zip(data.index, data["answer_type"], strict=True))
        result = vqa_accuracy(pred, answers, types)
        metrics = {"vqa_accuracy": result["overall"]}
        metrics.update({f"vqa_accuracy/{t}": v for t, v in result["per_answer_type"].items()})
        # Single-answer datasets (GQA) are scored by exact match; VQA accuracy cannot reach 100 there.
        metrics["exact_match"] = exact_match_accuracy(pred, answers)["overall"]
        # Word error rate against the most common answer (ties: the first listed), as generated.
        majority = {sid: majority_answer(a) for sid, a in answers.items()}
        scorable = {sid: m for sid, m in majority.items() if any(ch.isalnum() for ch in m)}
        if scorable:  # an answer with no word (punctuation only) has no word error rate
            metrics["wer"] = word_error_rate({sid: pred[sid] for sid in scorable}, scorable)["wer"]
        if self.multiple_choice.applies(data):
            metrics.update(self.multiple_choice.score(data, pred, types))
        return metrics

    def answer_key(self, text: str) -> Any:
        from vlmopt.metrics.vqa import normalize_answer

        return normalize_answer(text)

    def judge(self, text: str, row: pd.Series) -> bool | None:
        return self.answer_key(text) == self.answer_key(majority_answer(cell_strings(row["answers"])))
