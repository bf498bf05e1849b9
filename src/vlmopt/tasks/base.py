"""The task interface: what a task knows about its data, its prompts, its training targets and its scores.

A task never loads or runs a model: prompts come through the family adapter it is handed, and
scoring reads predictions and the dataset table only (it runs on CPU nodes without torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:  # annotations only: scoring reads tasks without loading model code
    from vlmopt.models.base import FamilyAdapter

__all__ = ["Task", "aligned", "cell_strings", "majority_answer"]


class Task:
    """One evaluation task. Subclasses set the class attributes and implement the methods.

    Registering an instance in :data:`vlmopt.tasks.TASKS` is all it takes for the pipeline to plan,
    run, score, tabulate and plot it.
    """

    name: str = ""
    #: Dataset table columns the task needs (besides ``sample_id`` and ``image``).
    columns: tuple[str, ...] = ()
    #: ``"generate"``: a prediction is generated text; ``"similarity"``: a list of image-text scores.
    kind: str = "generate"
    #: Whether finetuning and calibration use the task when no tasks are named and the table serves it.
    default_training: bool = True
    #: The metric that stands for the task in figures, budgets and the report, and its axis label.
    headline: str = ""
    headline_label: str = ""
    #: Whether a larger headline metric is better.
    higher_is_better: bool = True
    #: The quality metrics the report's tables show for the task, headline included.
    metrics: tuple[str, ...] = ()
    #: Dataset columns that hold the truth a prediction is shown against (before/after examples).
    truth_columns: tuple[str, ...] = ()
    #: True when a generated answer is read as one of the table's classes (``label_name``): the
    #: scores count answers per true class (confusion matrices) and examples show the class read.
    answers_are_classes: bool = False
    #: How :meth:`judge` decides right or wrong, for a figure's legend; empty when it does not judge.
    judge_rule: str = ""

    @property
    def generative(self) -> bool:
        """True when the model answers in generated text (the task has examples to show)."""
        return self.kind == "generate"

    def vocabulary(self) -> list[str]:
        """Texts beyond the dataset's own that a tiny model's word-level tokenizer must know for the task."""
        return []

    def prompts(self, df: pd.DataFrame, adapter: FamilyAdapter) -> list[str]:
        raise NotImplementedError

    def targets(self, df: pd.DataFrame, epoch: int) -> list[str]:
        """Training targets; ``epoch`` lets tasks with several references rotate through them."""
        raise NotImplementedError

    def inference_settings(self, dataset: dict[str, Any], inference: dict[str, Any]) -> dict[str, Any]:
        """The task's own prediction settings from the study's dataset entry and inference settings."""
        return {}

    def score(self, predictions: pd.DataFrame, table: pd.DataFrame, *, source: str = "") -> dict[str, float]:
        """Metrics of ``predictions`` (one row per sample of ``table``) against the dataset ``table``.

        ``source`` names the table in error messages.
        """
        raise NotImplementedError

    def answer_key(self, text: str) -> Any:
        """What two generated answers must share to count as the same answer (as the task scores them)."""
        return " ".join(text.lower().split()).rstrip(" .")

    def judge(self, text: str, row: pd.Series) -> bool | None:
        """Whether ``text`` answers ``row`` right, or None where the task does not judge single answers."""
        return None


def aligned(predictions: pd.DataFrame, table: pd.DataFrame, source: str) -> tuple[pd.DataFrame, dict[str, str]]:
    """``table`` indexed by ``sample_id`` in the predictions' order, and each sample's prediction text.

    Predictions must cover exactly the samples of ``table``; a missing prediction reads as "".
    """
    if set(predictions["sample_id"]) != set(table["sample_id"]):
        raise ValueError(f"the predictions do not cover exactly the samples of {source or 'the table'}")
    data = table.set_index("sample_id").loc[predictions["sample_id"]]
    texts = dict(zip(predictions["sample_id"], predictions["prediction"].fillna(""), strict=True))
    return data, texts


def majority_answer(answers: list[str]) -> str:
    """The most frequent answer; ties go to the earliest listed."""
    if not answers:
        return ""
    return max(answers, key=lambda a: (answers.count(a), -answers.index(a)))


def cell_strings(value: Any) -> list[str]:
    """A list cell of a table (references, answers) as strings; a missing cell as no strings."""
    import numpy as np

    return [str(v) for v in value] if isinstance(value, list | tuple | np.ndarray) else []
