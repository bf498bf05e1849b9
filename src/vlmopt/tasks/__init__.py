"""Tasks: how a dataset row becomes a prompt, a training target, and what a prediction is scored against.

Adding a task is one class and one entry in ``TASKS``. Tasks know prompts through the family
adapter and never load or run a model themselves.
"""

from __future__ import annotations

from collections import Counter

import pandas as pd

from vlmopt.models.base import FamilyAdapter

__all__ = ["TASKS", "CaptioningTask", "Task", "VqaTask", "get_task"]


class Task:
    name: str = ""
    #: Dataset columns the task needs (DESIGN §3).
    columns: tuple[str, ...] = ()

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


TASKS: dict[str, Task] = {t.name: t for t in (CaptioningTask(), VqaTask())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]
