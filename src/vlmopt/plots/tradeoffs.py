"""Quality against cost (latency, size, FLOPs, energy), with the Pareto front of each task marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from vlmopt.plots.labels import label_points
from vlmopt.plots.style import MARKERS, _save, _tasks, method_colour, plt
from vlmopt.tasks import get_task

__all__ = ["COSTS", "cost_figure", "pareto_front", "quality_vs_cost"]

#: Cost columns of the summary table (lower is better), with their axis labels, in panel order.
COSTS = {
    "latency_ms_per_sample_p50": "latency per sample (ms, median)",
    "nominal_size_bytes": "nominal size (MB, weights at their bit width)",
    "gflops_per_sample": "GFLOP per sample",
    "energy_j_per_sample": "energy per sample (J)",
}
_SCALE = {"nominal_size_bytes": 1e-6}
# Panels per row of a one-cost figure.
_WRAP = 3


def pareto_front(cost: Sequence[float], quality: Sequence[float]) -> np.ndarray:
    """Mask of the points no other point beats: none costs at most as much with at least the quality,
    better in one. Points with a missing value are never on the front; equal points are both on it."""
    x = np.asarray(cost, dtype=float)
    y = np.asarray(quality, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"cost and quality differ in length: {x.shape} vs {y.shape}")
    ok = ~(np.isnan(x) | np.isnan(y))
    front = np.zeros(len(x), dtype=bool)
    idx = np.flatnonzero(ok)
    for i in idx:
        dominated = (x[idx] <= x[i]) & (y[idx] >= y[i]) & ((x[idx] < x[i]) | (y[idx] > y[i]))
        front[i] = not dominated.any()
    return front


def quality_vs_cost(summary: pd.DataFrame, out: str | Path) -> Path:
    """:func:`cost_figure` saved as a PNG."""
    return _save(cost_figure(summary), out)


def _simulated(rows: pd.DataFrame) -> pd.Series:
    if "simulated" not in rows.columns:
        return pd.Series(False, index=rows.index)
    return rows["simulated"].astype("boolean").fillna(False).astype(bool)


def _methods(rows: pd.DataFrame) -> pd.Series:
    if "method" not in rows.columns:
        return pd.Series("none", index=rows.index)
    return rows["method"].fillna("none").astype(str)


def cost_figure(summary: pd.DataFrame, costs: Sequence[str] | None = None) -> plt.Figure:
    """A grid of panels: one row per cost that the summary has values of, one column per task (with
    more than three tasks, one row per task and a column per cost; with one cost, the tasks three
    to a row).

    ``costs`` picks the costs (default: every cost in :data:`COSTS` with values). Each panel plots
    the task's headline metric against the cost, a colour per compression method (the same in
    every figure, :func:`~vlmopt.plots.style.method_colour`) and a marker per model (hollow when
    not finetuned); every point is labelled with its variant where a free place near it exists
    (:func:`~vlmopt.plots.labels.label_points`; only the front's points in a panel of more than
    60). The Pareto front (cheapest for its quality) is joined by a grey line and labelled first.
    Baselines (variant ``baseline``) are ringed in black. Simulated variants (fake-quantized weights
    in float tensors) have a dashed outline and a pale fill: their latency and energy are the dense
    model's, their size is nominal.
    """
    tasks = _tasks(summary)
    if not tasks:
        raise ValueError("summary has no task with a headline metric to plot")
    wanted = list(COSTS) if costs is None else list(costs)
    unknown = [c for c in wanted if c not in COSTS]
    if unknown:
        raise ValueError(f"unknown cost column(s) {unknown}; known: {list(COSTS)}")
    costs = [c for c in wanted if c in summary.columns and summary[c].notna().any()]
    if not costs:
        raise ValueError(f"summary has none of the cost columns {wanted} with values")
    methods = sorted(set(_methods(summary)))
    models = sorted(summary["model"].unique())
    marker = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(models)}
    # One cost: the tasks wrap into rows of at most three panels, so that the figure stays readable
    # at a page's width. Several costs: a row per cost, a column per task; with more tasks than
    # that, a row per task and a column per cost.
    if len(costs) == 1:
        ncols = min(_WRAP, len(tasks))
        nrows = -(-len(tasks) // ncols)
        place = {(costs[0], t): divmod(i, ncols) for i, t in enumerate(tasks)}
    elif len(tasks) > _WRAP:
        nrows, ncols = len(tasks), len(costs)
        place = {(c, t): (r, i) for r, t in enumerate(tasks) for i, c in enumerate(costs)}
    else:
        nrows, ncols = len(costs), len(tasks)
        place = {(c, t): (r, i) for r, c in enumerate(costs) for i, t in enumerate(tasks)}
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 4.6 * nrows), squeeze=False)
    for ax in axes.flat[len(place) :]:
        ax.set_visible(False)
    to_label = []
    for cost in costs:
        for task in tasks:
            ax = axes[place[(cost, task)][0]][place[(cost, task)][1]]
            metric, label = get_task(task).headline, get_task(task).headline_label
            rows = summary[summary["task"] == task]
            x = rows[cost].astype(float) * _SCALE.get(cost, 1.0)
            y = rows[metric].astype(float)
            simulated = _simulated(rows)
            for (_, r), xi, yi, sim, method in zip(rows.iterrows(), x, y, simulated, _methods(rows), strict=True):
                ax.scatter(
                    xi,
                    yi,
                    color=method_colour(method) if r["ft"] != "none" else "none",
                    edgecolors=method_colour(method),
                    marker=marker[r["model"]],
                    s=55,
                    linewidths=1.5,
                    alpha=0.45 if sim else 1.0,
                    linestyle="--" if sim else "-",
                    label=f"{r['model']}/{r['ft']}/{r['variant']}",
                )
                if r["variant"] == "baseline":
                    ax.scatter(xi, yi, s=190, facecolors="none", edgecolors="black", linewidths=1.0, label="_baseline")
            on = pareto_front(x, y)
            if not (x.notna() & y.notna()).any():
                # The task has no value of this cost (or of its metric): say so, not an empty grid.
                ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="gray")
                ax.set_xticks([])
                ax.set_yticks([])
            if on.any():
                order = np.argsort(x.to_numpy()[on])
                ax.plot(x.to_numpy()[on][order], y.to_numpy()[on][order], color="gray", linewidth=1, zorder=0)
            ax.set_xlabel(COSTS[cost])
            ax.set_ylabel(label)
            if place[(cost, task)][0] == 0 or len(costs) == 1 or len(tasks) > _WRAP:
                ax.set_title(task)
            ax.grid(alpha=0.3)
            ax.margins(0.12)
            to_label.append((ax, x, y, rows["variant"].to_numpy(), on))
    handles = [plt.Line2D([], [], color=method_colour(m), marker="o", linestyle="", label=m) for m in methods]
    handles += [plt.Line2D([], [], color="gray", marker=marker[m], linestyle="", label=m) for m in models]
    handles += [
        plt.Line2D([], [], color="gray", marker="o", markerfacecolor="none", linestyle="", label="not finetuned"),
        plt.Line2D([], [], color="gray", marker="o", alpha=0.45, linestyle="", label="simulated (pale)"),
        plt.Line2D(
            [], [], color="black", marker="o", markersize=12, markerfacecolor="none", linestyle="", label="baseline"
        ),
        plt.Line2D([], [], color="gray", linewidth=1, label="Pareto front"),
    ]
    fig.tight_layout()
    # Labels last: their places are computed on the final layout.
    for ax, x, y, names, on in to_label:
        label_points(ax, x, y, names, priority=on)
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title="method / model")
    return fig
