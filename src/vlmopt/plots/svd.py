"""Low-rank (truncated SVD) study: quality against the ratio of parameters kept and the layers factorized.

Each SVD variant factorizes the selected weights (e.g. the attention projections of the vision
encoder) in some number of layers, keeping about ``ratio`` of each weight's parameters. The figure
has one row of panels per model / finetune / task / dataset and selection (part and role):

- a heat map of the task's headline metric, rows the number of layers factorized, columns the
  ratio kept, each cell written out; a blank cell was not evaluated. Read along a row to see how
  quality falls as fewer parameters are kept, down a column to see how it falls as more layers
  are factorized. A task that reports top-5 accuracy (classification) adds a second heat map of it.
- the same values as lines against the ratio, one line per number of layers (darker = fewer layers),
  with the uncompressed model (variant ``baseline``) as a dashed horizontal line: the gap to it is
  the cost of the factorization.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from vlmopt.plots.style import _save, plt
from vlmopt.tasks import TASKS, get_task

__all__ = ["quality_vs_svd", "svd_figure", "svd_grid"]

_KEYS = ["model", "ft", "task", "dataset"]
_TOP5_LABEL = "top-5 accuracy (%)"
# Heat maps show values (cividis); lines are told apart by the number of layers (viridis). Both are
# perceptually uniform and readable with the common colour-vision deficiencies.
_HEAT_CMAP = "cividis"
_LINE_CMAP = "viridis"


def svd_grid(summary: pd.DataFrame, variants: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, ft, task, dataset, variant) of the variants made by a single ``svd`` step.

    Columns: model, ft, task, dataset, part, role, position, variant, ratio, n_layers, metric (the
    task's headline metric), value, and ``top5`` where the summary has a top-5 column (NaN for tasks
    whose metrics do not include it). Variants that combine SVD with other steps are left
    out, since their quality is not the factorization's alone; so are tasks without a headline metric.
    A variants table without ``n_layers`` (older studies) gives NaN there.
    """
    columns = ["model", "ft", "task", "dataset", "part", "role", "position", "variant", "ratio", "n_layers"]
    columns += ["metric", "value"] + (["top5"] if "top5" in summary.columns else [])
    steps = variants[variants["step"] >= 0]
    counts = steps.groupby(["model", "ft", "variant"])["step"].transform("size")
    single = steps[(counts == 1) & (steps["method"] == "svd")].copy()
    for name in ("part", "role", "position", "ratio", "n_layers"):
        if name not in single.columns:
            single[name] = np.nan
    single = single[["model", "ft", "variant", "part", "role", "position", "ratio", "n_layers"]]
    keep = [c for c in summary.columns if c not in {"part", "role", "position", "ratio", "n_layers", "method"}]
    rows = summary[keep].merge(single, on=["model", "ft", "variant"], how="inner")
    frames = []
    for task, spec in TASKS.items():
        metric = spec.headline
        mine = rows[rows["task"] == task]
        if mine.empty or metric not in mine.columns:
            continue
        mine = mine.assign(metric=metric, value=pd.to_numeric(mine[metric], errors="coerce"))
        if "top5" in columns and "top5" not in spec.metrics:
            mine = mine.assign(top5=np.nan)
        frames.append(mine[columns])
    if not frames:
        return pd.DataFrame(
            {c: pd.Series(dtype="float64" if c in {"ratio", "n_layers", "value"} else "object") for c in columns}
        )
    grid = pd.concat(frames, ignore_index=True)
    grid["ratio"] = grid["ratio"].astype("float64")
    grid["n_layers"] = grid["n_layers"].astype("float64")
    return grid.sort_values([*_KEYS, "part", "role", "n_layers", "ratio", "variant"], ignore_index=True)


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _selection(part: object, role: object, position: object | None) -> str:
    """The selection in words (e.g. vision attention, all weights), with the position in brackets when
    panels differ by it."""
    text = f"{'all' if _missing(part) else part} {'weights' if _missing(role) or role == 'all' else role}"
    return text if position is None else f"{text} ({'all' if _missing(position) else position})"


def _position_order(position: object) -> tuple[int, str]:
    """First, middle, last in model order, then the rest by name."""
    order = {"first": 0, "middle": 1, "last": 2, "all": 3}
    return (-1, "") if position is None else (order.get(str(position), 4), str(position))


def _panels(grid: pd.DataFrame) -> list[tuple[tuple, str, pd.DataFrame]]:
    """(model, ft, task, dataset) x selection groups, each with its title and rows.

    Variants are grouped by part and role; a group in which two variants would share a cell (same
    ratio and number of layers) is split further by position.
    """
    panels = []
    for key, rows in grid.groupby([*_KEYS, "part", "role"], dropna=False, sort=True):
        model, ft, task, dataset, part, role = key
        cells = rows[["ratio", "n_layers"]].fillna(-1.0)
        by_position = cells.duplicated().any() and rows["position"].nunique(dropna=False) > 1
        parts = list(rows.groupby("position", dropna=False, sort=False)) if by_position else [(None, rows)]
        for position, mine in sorted(parts, key=lambda p: _position_order(p[0])):
            title = f"{model} / {ft} / {task} ({dataset}): SVD of {_selection(part, role, position)}"
            panels.append(((model, ft, task, dataset), title, mine))
    return panels


def _layer_keys(rows: pd.DataFrame) -> list[float]:
    """Numbers of layers in ascending order, NaN (not recorded) last."""
    known = sorted(float(n) for n in rows["n_layers"].dropna().unique())
    return known + ([math.nan] if rows["n_layers"].isna().any() else [])


def _layer_label(n: float) -> str:
    return "unknown" if math.isnan(n) else f"{n:g}"


def _matrix(rows: pd.DataFrame, column: str, layers: list[float], ratios: list[float]) -> np.ndarray:
    """Values by (number of layers, ratio); NaN where no variant was evaluated (mean of duplicates)."""
    out = np.full((len(layers), len(ratios)), np.nan)
    for i, n in enumerate(layers):
        same_n = rows["n_layers"].isna() if math.isnan(n) else rows["n_layers"] == n
        for j, r in enumerate(ratios):
            values = pd.to_numeric(rows.loc[same_n & (rows["ratio"] == r), column], errors="coerce").dropna()
            if not values.empty:
                out[i, j] = float(values.mean())
    return out


def _decimals(values: np.ndarray) -> int:
    """Decimals that show a panel's values at a common precision (one for percentages)."""
    finite = np.abs(values[np.isfinite(values)])
    top = float(finite.max()) if finite.size else 0.0
    return 0 if top >= 1000 else 1 if top >= 10 else 2 if top >= 1 else 3


def _fmt(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def _heat_map(ax: plt.Axes, fig, values: np.ndarray, layers: list[float], ratios: list[float], label: str) -> None:
    """Values as coloured cells, each written out; NaN cells stay blank."""
    cmap = plt.get_cmap(_HEAT_CMAP).with_extremes(bad="white")
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if low == high:
        low, high = low - 0.5, high + 0.5
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=low, vmax=high, aspect="auto")
    fontsize = 8 if len(ratios) <= 9 else 6
    decimals = _decimals(values)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            if not np.isfinite(v):
                continue
            red, green, blue, _ = cmap((v - low) / (high - low))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(
                j, i, _fmt(v, decimals), ha="center", va="center", fontsize=fontsize, color="white" if dark else "black"
            )
    ax.set_xticks(range(len(ratios)), [f"{r:g}" for r in ratios])
    ax.set_yticks(range(len(layers)), [_layer_label(n) for n in layers])
    ax.set_xlabel("ratio of parameters kept")
    ax.set_ylabel("layers factorized")
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    bar = fig.colorbar(image, ax=ax, shrink=0.9, pad=0.02)
    bar.set_label(label)


def _baseline(summary: pd.DataFrame, key: tuple, column: str) -> float | None:
    if column not in summary.columns:
        return None
    model, ft, task, dataset = key
    base = summary[
        (summary["model"] == model)
        & (summary["ft"] == ft)
        & (summary["task"] == task)
        & (summary["dataset"] == dataset)
        & (summary["variant"] == "baseline")
    ]
    values = pd.to_numeric(base[column], errors="coerce").dropna()
    return float(values.iloc[0]) if not values.empty else None


def _lines(
    ax: plt.Axes, values: np.ndarray, layers: list[float], ratios: list[float], baseline: float | None, label: str
) -> None:
    """One line per number of layers against the ratio, and the baseline as a dashed line."""
    cmap = plt.get_cmap(_LINE_CMAP)
    shades = [0.45] if len(layers) == 1 else np.linspace(0.0, 0.85, len(layers))
    for i, n in enumerate(layers):
        present = np.isfinite(values[i])
        if not present.any():
            continue
        ax.plot(
            np.asarray(ratios)[present],
            values[i][present],
            marker="o",
            markersize=4,
            linewidth=1.5,
            color=cmap(shades[i]),
            label=_layer_label(n),
        )
    if baseline is not None:
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1.2, label="baseline")
    ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
    if len(ratios) == 1:
        ax.set_xlim(ratios[0] - 0.1, ratios[0] + 0.1)
    ax.set_xlabel("ratio of parameters kept")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        frameon=False,
        fontsize=8,
        title="layers factorized",
        title_fontsize=8,
    )


def svd_figure(summary: pd.DataFrame, variants: pd.DataFrame) -> plt.Figure:
    """A row of panels per (model, ft, task, dataset) and selection with SVD variants (see the module).

    Heat map axes are labelled ``svd-heatmap`` (``svd-heatmap-top5`` for top-5), line axes ``svd-lines``.
    """
    grid = svd_grid(summary, variants)
    grid = grid[grid["ratio"].notna()]
    if grid.empty:
        raise ValueError("summary has no SVD variants (single-step svd with a ratio) with a headline metric")
    panels = _panels(grid)
    shapes = []
    for _, _, rows in panels:
        top5 = "top5" in rows.columns and rows["top5"].notna().any()
        shapes.append((len(_layer_keys(rows)), rows["ratio"].nunique(), top5))
    n_cols = max(s[1] for s in shapes)
    any_top5 = any(s[2] for s in shapes)
    heat_width = max(3.4, 0.55 * n_cols + 2.0)
    heights = [max(2.8, 0.42 * s[0] + 1.9) for s in shapes]
    width = heat_width * (2 if any_top5 else 1) + 5.6
    fig = plt.figure(figsize=(width, sum(heights)), layout="constrained")
    # Room between a colour bar's label and the next panel's axis label.
    fig.get_layout_engine().set(w_pad=0.1, wspace=0.06)
    rows_of_panels = fig.subfigures(len(panels), 1, height_ratios=heights, squeeze=False)[:, 0]
    for sub, (key, title, rows), (_, _, top5) in zip(rows_of_panels, panels, shapes, strict=True):
        task = key[2]
        metric, label = get_task(task).headline, get_task(task).headline_label
        layers = _layer_keys(rows)
        ratios = sorted(float(r) for r in rows["ratio"].unique())
        heat_widths = [heat_width] * (2 if top5 else 1)
        axes = sub.subplots(1, len(heat_widths) + 1, width_ratios=[*heat_widths, 5.6])
        values = _matrix(rows, "value", layers, ratios)
        baseline = _baseline(summary, key, metric)
        heat = axes[0]
        heat.set_label("svd-heatmap")
        _heat_map(heat, sub, values, layers, ratios, label)
        heat.set_title(
            label + (f", baseline {_fmt(baseline, _decimals(values))}" if baseline is not None else ""), fontsize=10
        )
        if top5:
            top5_values = _matrix(rows, "top5", layers, ratios)
            base5 = _baseline(summary, key, "top5")
            axes[1].set_label("svd-heatmap-top5")
            _heat_map(axes[1], sub, top5_values, layers, ratios, _TOP5_LABEL)
            axes[1].set_title(
                _TOP5_LABEL + (f", baseline {_fmt(base5, _decimals(top5_values))}" if base5 is not None else ""),
                fontsize=10,
            )
        lines = axes[-1]
        lines.set_label("svd-lines")
        _lines(lines, values, layers, ratios, baseline, label)
        sub.suptitle(title, fontsize=11, fontweight="bold")
    return fig


def quality_vs_svd(summary: pd.DataFrame, variants: pd.DataFrame, out: str | Path) -> Path:
    """:func:`svd_figure` saved as a PNG."""
    return _save(svd_figure(summary, variants), out)
