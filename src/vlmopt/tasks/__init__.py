"""Tasks: how a dataset row becomes a prompt, a training target, and what a prediction is scored against.

Adding a task is one class and one entry in ``TASKS``. Tasks know prompts through the family
adapter and never load or run a model themselves.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:  # annotations only: scoring reads tasks without loading model code
    from vlmopt.models.base import FamilyAdapter

__all__ = [
    "DEFAULT_TEMPLATES",
    "TASKS",
    "CaptioningTask",
    "ClassificationTask",
    "REAL_VS_GENERATED_QUESTION",
    "RealVsGeneratedTask",
    "RetrievalTask",
    "Task",
    "VqaTask",
    "get_task",
    "served_tasks",
    "task_vocabulary",
]

#: CLIP's default zero-shot prompt (Radford et al. 2021, section 3.1.4).
DEFAULT_TEMPLATES = ("a photo of a {}.",)
#: What a generative model is asked about an image in the real-vs-generated task.
REAL_VS_GENERATED_QUESTION = "Is this image real or AI-generated?"


class Task:
    name: str = ""
    #: Dataset columns the task needs (DESIGN §3).
    columns: tuple[str, ...] = ()
    #: ``"generate"``: a prediction is generated text; ``"similarity"``: a list of image-text scores.
    kind: str = "generate"
    #: Whether finetuning and calibration use the task when no tasks are named and the table serves it.
    default_training: bool = True

    def vocabulary(self) -> list[str]:
        """Texts beyond the dataset's own that a tiny model's word-level tokenizer must know for the task."""
        return []

    def prompts(self, df: pd.DataFrame, adapter: FamilyAdapter) -> list[str]:
        raise NotImplementedError

    def targets(self, df: pd.DataFrame, epoch: int) -> list[str]:
        """Training targets; ``epoch`` lets tasks with several references rotate through them."""
        raise NotImplementedError


class CaptioningTask(Task):
    name = "captioning"
    columns = ("references",)

    def prompts(self, df: pd.DataFrame, adapter: FamilyAdapter) -> list[str]:
        return [adapter.prompt(self.name)] * len(df)

    def targets(self, df: pd.DataFrame, epoch: int) -> list[str]:
        return [list(refs)[(epoch + i) % len(refs)] for i, refs in enumerate(df["references"])]


class VqaTask(Task):
    name = "vqa"
    columns = ("question", "answers", "answer_type")

    def prompts(self, df: pd.DataFrame, adapter: FamilyAdapter) -> list[str]:
        return [adapter.prompt(self.name, q) for q in df["question"]]

    def targets(self, df: pd.DataFrame, epoch: int) -> list[str]:
        # The most frequent annotator answer; ties go to the earliest listed.
        return [Counter(answers).most_common(1)[0][0] for answers in df["answers"]]


class RetrievalTask(Task):
    """Image-text retrieval over every caption of a split: each image's scores against all captions."""

    name = "retrieval"
    columns = ("captions",)
    kind = "similarity"

    def prompts(self, df: pd.DataFrame, adapter: FamilyAdapter) -> list[str]:
        return self.targets(df, 0)

    def targets(self, df: pd.DataFrame, epoch: int) -> list[str]:
        return [list(caps)[(epoch + i) % len(caps)] for i, caps in enumerate(df["captions"])]

    @staticmethod
    def texts(df: pd.DataFrame) -> tuple[list[str], list[int]]:
        """Every caption of ``df`` in row order, and the row index of the image each belongs to."""
        texts, owners = [], []
        for row, caps in enumerate(df["captions"]):
            texts.extend(caps)
            owners.extend([row] * len(caps))
        return texts, owners


class ClassificationTask(Task):
    """Zero-shot classification: an image against one text per class (an ensemble of templates)."""

    name = "classification"
    columns = ("label", "label_name")
    kind = "similarity"

    def prompts(self, df: pd.DataFrame, adapter: FamilyAdapter) -> list[str]:
        return self.targets(df, 0)

    def targets(self, df: pd.DataFrame, epoch: int) -> list[str]:
        return [DEFAULT_TEMPLATES[0].format(name) for name in df["label_name"]]

    @staticmethod
    def classes(df: pd.DataFrame) -> tuple[list[int], list[str]]:
        """The labels of ``df`` in ascending order and their names; a label with two names is an error."""
        names: dict[int, str] = {}
        for label, name in zip(df["label"], df["label_name"], strict=True):
            if names.setdefault(int(label), name) != name:
                raise ValueError(f"label {int(label)} has two names: {names[int(label)]!r} and {name!r}")
        labels = sorted(names)
        return labels, [names[label] for label in labels]

    @staticmethod
    def class_texts(names: list[str], templates: tuple[str, ...] | list[str] = DEFAULT_TEMPLATES) -> list[list[str]]:
        """Per class, its name set in each template (``{}`` marks where the name goes)."""
        templates = list(templates)
        if not templates or any(t.count("{}") != 1 for t in templates):
            raise ValueError(f"templates must each hold one '{{}}' for the class name, got {templates}")
        return [[t.format(name) for t in templates] for name in names]


class RealVsGeneratedTask(Task):
    """Real-vs-generated classification by a generative model: it answers in words, read by a rule.

    The prompt asks :data:`REAL_VS_GENERATED_QUESTION` (each family words it in its own
    ``real_vs_generated`` prompt); the training target is the row's ``text`` (a labeled dataset,
    :mod:`vlmopt.data.labeling`) or else the bare label statement. Scoring reads the label back
    with :func:`vlmopt.metrics.real_vs_generated.extract_label`. Finetuning uses the task only when
    it is named or the table serves no other task, so adding labels to a captioning set does not
    change what its default finetuning learns.
    """

    name = "real_vs_generated"
    columns = ("label", "label_name")
    default_training = False

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


TASKS: dict[str, Task] = {
    t.name: t for t in (CaptioningTask(), VqaTask(), RetrievalTask(), ClassificationTask(), RealVsGeneratedTask())
}


def served_tasks(
    candidates: tuple[str, ...] | list[str], columns: Iterable[str], *, requested: bool = False
) -> tuple[str, ...]:
    """The tasks of ``candidates`` that a table with ``columns`` serves (has every column of).

    Unless the candidates were ``requested`` by name, tasks trained only on request
    (``default_training`` false) are left out when the table serves any other task.
    """
    columns = set(columns)
    served = tuple(t for t in candidates if all(c in columns for c in get_task(t).columns))
    if requested:
        return served
    preferred = tuple(t for t in served if get_task(t).default_training)
    return preferred or served


def task_vocabulary(columns: Iterable[str]) -> list[str]:
    """The extra texts (:meth:`Task.vocabulary`) of every task a table with ``columns`` serves."""
    columns = set(columns)
    out: list[str] = []
    for task in TASKS.values():
        if all(c in columns for c in task.columns):
            out += task.vocabulary()
    return out


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]
