"""Quality-versus-size scatter and per-task bar charts of a study's summary table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from vlmopt.plots.style import _save, _tasks, method_colour, plt
from vlmopt.plots.tradeoffs import cost_figure
from vlmopt.tasks import get_task

__all__ = ["quality_vs_size", "task_bars"]


def quality_vs_size(summary: pd.DataFrame, out: str | Path) -> Path:
    """One panel per task: headline metric against nominal model size, a colour per method, a
    marker per model, every variant labelled (the size row of
    :func:`~vlmopt.plots.tradeoffs.cost_figure`, with its Pareto front).

    The nominal size counts each weight at its bit width, so simulated quantization (whose file
    does not shrink) is placed where a real kernel would put it; the serialized size is in the table.
    """
    size = "nominal_size_bytes" if "nominal_size_bytes" in summary.columns else None
    if size is None:
        raise ValueError("summary has no nominal_size_bytes column")
    fig = cost_figure(summary, costs=[size])
    for ax in fig.axes:
        if ax.get_title():
            ax.set_title(f"{ax.get_title()}: quality vs size")
    return _save(fig, out)


def task_bars(summary: pd.DataFrame, out: str | Path) -> Path:
    """One panel per task: headline metric of every model × finetune × variant as horizontal bars."""
    tasks = _tasks(summary)
    if not tasks:
        raise ValueError("summary has no task with a headline metric to plot")
    columns = ["model", "ft", "variant"] + (["method"] if "method" in summary.columns else [])
    keys = summary[columns].drop_duplicates(["model", "ft", "variant"]).sort_values(["model", "ft", "variant"])
    methods = keys["method"].fillna("none").astype(str) if "method" in keys else pd.Series("none", index=keys.index)
    colours = [method_colour(m) for m in methods]
    names = [f"{r.model} / {r.ft} / {r.variant}" for r in keys.itertuples()]
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(3.5 + 4 * len(tasks), 0.35 * len(names) + 1.5), squeeze=False, sharey=True
    )
    for ax, task in zip(axes[0], tasks, strict=True):
        metric, label = get_task(task).headline, get_task(task).headline_label
        values = keys[["model", "ft", "variant"]].merge(
            summary[summary["task"] == task], on=["model", "ft", "variant"], how="left"
        )[metric]
        bars = ax.barh(range(len(names)), values.fillna(0), color=colours)
        ax.bar_label(bars, labels=["" if pd.isna(v) else f"{v:.3g}" for v in values], fontsize=7, padding=2)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel(label)
        ax.set_title(task)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.12)
    axes[0][0].invert_yaxis()
    handles = [
        plt.Line2D([], [], color=method_colour(m), marker="s", linestyle="", label=m) for m in sorted(set(methods))
    ]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, title="method")
    return _save(fig, out)
