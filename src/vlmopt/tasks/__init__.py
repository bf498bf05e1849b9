"""Tasks: how a dataset row becomes a prompt, a training target, and what a prediction is scored against.

Adding a task is one class and one entry in ``TASKS``. Tasks know prompts through the family
adapter and never load or run a model themselves.
"""

from __future__ import annotations

from collections import Counter

import pandas as pd

from vlmopt.models.base import FamilyAdapter

__all__ = [
    "DEFAULT_TEMPLATES",
    "TASKS",
    "CaptioningTask",
    "ClassificationTask",
    "RetrievalTask",
    "Task",
    "VqaTask",
    "get_task",
]

#: CLIP's default zero-shot prompt (Radford et al. 2021, section 3.1.4).
DEFAULT_TEMPLATES = ("a photo of a {}.",)


class Task:
    name: str = ""
    #: Dataset columns the task needs (DESIGN §3).
    columns: tuple[str, ...] = ()
    #: ``"generate"``: a prediction is generated text; ``"similarity"``: a list of image-text scores.
    kind: str = "generate"

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


TASKS: dict[str, Task] = {t.name: t for t in (CaptioningTask(), VqaTask(), RetrievalTask(), ClassificationTask())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]
