"""Confusion matrices of the real-vs-generated classifiers (the GenImage study), one per configuration.

They are drawn for the tasks whose generated answers are read as classes
(:func:`vlmopt.study.figures.reads_classes`): their scores count the answers per true class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from vlmopt.plots.style import _save, plt
from vlmopt.study import reads_classes
from vlmopt.tasks import TASKS

__all__ = ["CLASSES", "PREDICTIONS", "confusion_counts", "confusion_figure", "confusion_matrices"]

#: True classes (rows) and predicted answers (columns); "unparsed" is an answer that names neither.
CLASSES = ("real", "generated")
PREDICTIONS = ("real", "generated", "unparsed")


def confusion_counts(row: pd.Series) -> np.ndarray:
    """The (2, 3) count matrix of one summary row from its ``cm_<true>_as_<predicted>`` columns."""
    counts = np.zeros((len(CLASSES), len(PREDICTIONS)))
    for i, true in enumerate(CLASSES):
        for j, predicted in enumerate(PREDICTIONS):
            value = row.get(f"cm_{true}_as_{predicted}")
            counts[i, j] = 0.0 if value is None or pd.isna(value) else float(value)
    return counts


def confusion_figure(summary: pd.DataFrame) -> plt.Figure:
    """One panel per (model, finetune, variant) evaluated on real_vs_generated (a task whose answers
    are read as classes): counts, and the share of each true class, with accuracy in the title."""
    classifying = [name for name, task in TASKS.items() if reads_classes(task)]
    rows = summary[summary["task"].isin(classifying)]
    counted = [c for c in rows.columns if c.startswith("cm_")]
    rows = rows[rows[counted].notna().any(axis=1)] if counted else rows.iloc[:0]
    if rows.empty:
        raise ValueError("no real_vs_generated configuration with confusion counts (cm_* columns)")
    rows = rows.sort_values(["model", "ft", "variant", "dataset"])
    n = len(rows)
    cols = min(n, 4)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.6 * cols, 3.0 * ((n + cols - 1) // cols)))
    axes = np.atleast_1d(axes).ravel()
    for ax, (_, row) in zip(axes, rows.iterrows(), strict=False):
        counts = confusion_counts(row)
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(CLASSES)):
            for j in range(len(PREDICTIONS)):
                colour = "white" if share[i, j] > 0.6 else "black"
                ax.text(
                    j, i, f"{int(counts[i, j])}\n{share[i, j]:.0%}", ha="center", va="center", color=colour, fontsize=8
                )
        ax.set_xticks(range(len(PREDICTIONS)), PREDICTIONS, fontsize=8)
        ax.set_yticks(range(len(CLASSES)), CLASSES, fontsize=8)
        ax.set_xlabel("answer", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        accuracy = row.get("accuracy")
        shown = "" if accuracy is None or pd.isna(accuracy) else f"\naccuracy {accuracy:.1f} %"
        ax.set_title(f"{row['model']} / {row['ft']} / {row['variant']}{shown}", fontsize=9)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def confusion_matrices(summary: pd.DataFrame, out: str | Path) -> Path:
    """:func:`confusion_figure` saved as a PNG."""
    return _save(confusion_figure(summary), out)
