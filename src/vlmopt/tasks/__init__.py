"""Tasks: how a dataset row becomes a prompt and a training target, how predictions are scored, and
which metric stands for the task.

Each task is one object (:class:`~vlmopt.tasks.base.Task`) registered in :data:`TASKS`; the pipeline's
planning, inference, scoring, tables, figures and report ask it instead of testing task names.
Adding a task is one module here and one entry in :data:`TASKS` (see docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Iterable

from vlmopt.tasks.base import Task, majority_answer
from vlmopt.tasks.captioning import CaptioningTask
from vlmopt.tasks.real_vs_generated import REAL_VS_GENERATED_QUESTION, RealVsGeneratedTask
from vlmopt.tasks.similarity import DEFAULT_TEMPLATES, ClassificationTask, RetrievalTask
from vlmopt.tasks.vqa import MultipleChoice, VqaTask

__all__ = [
    "DEFAULT_TEMPLATES",
    "GENERATIVE_TASKS",
    "REAL_VS_GENERATED_QUESTION",
    "TASKS",
    "CaptioningTask",
    "ClassificationTask",
    "MultipleChoice",
    "RealVsGeneratedTask",
    "RetrievalTask",
    "Task",
    "VqaTask",
    "get_task",
    "majority_answer",
    "served_tasks",
    "task_vocabulary",
]

#: Every task by name, in the order figures and tables list them.
TASKS: dict[str, Task] = {
    t.name: t for t in (CaptioningTask(), VqaTask(), RetrievalTask(), ClassificationTask(), RealVsGeneratedTask())
}

#: Tasks whose predictions are generated text (they have answers to show and WER-style metrics).
GENERATIVE_TASKS = tuple(name for name, task in TASKS.items() if task.generative)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]


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
