"""Drop-off: quality against bit width, one line per model part and position (the BLIP-2 grid study)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from vlmopt.plots.style import MARKERS, _save, _tasks, method_colour, plt
from vlmopt.study import QUANTIZERS
from vlmopt.tasks import get_task

__all__ = ["QUANTIZERS", "bit_width_lines", "bits_figure", "quality_vs_bits"]

# Line styles of the part and position selections (solid, dotted, dash-dot, ...); dashed is the baseline.
_STYLES = ["-", ":", "-.", (0, (6, 2)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3))]


def bit_width_lines(summary: pd.DataFrame, variants: pd.DataFrame) -> pd.DataFrame:
    """Summary rows of single-step weight-quantization variants, with ``method``, ``part``,
    ``position``, ``activation_bits`` and ``bits`` from the variants table (other variants left out)."""
    counts = variants.groupby(["model", "ft", "variant"])["step"].transform("size")
    single = variants[(counts == 1) & variants["method"].isin(QUANTIZERS) & variants["bits"].notna()]
    columns = ["model", "ft", "variant", "part", "position", "activation_bits", "bits"]
    steps = single.reindex(columns=columns).assign(quantizer=single["method"].to_numpy())
    # A step without a part or position selects all of it (and NaN keys would never match).
    for key in ("part", "position"):
        steps[key] = steps[key].astype(object).where(steps[key].notna(), "all")
    out = summary.drop(columns="method", errors="ignore")
    return out.merge(steps, on=["model", "ft", "variant"], how="inner")


def quality_vs_bits(summary: pd.DataFrame, variants: pd.DataFrame, out: str | Path) -> Path:
    """:func:`bits_figure` saved as a PNG."""
    return _save(bits_figure(summary, variants), out)


def bits_figure(summary: pd.DataFrame, variants: pd.DataFrame) -> plt.Figure:
    """One panel per task: the headline metric against the weights' bit width.

    A line per (model, finetune, quantizer, part, position) joins its bit widths, coloured by the
    quantizer (the method colours of every figure), dashed or dotted by part and position, with a
    marker per model; the model's
    unquantized variant without steps (``baseline``), where evaluated, is a dashed horizontal line
    in grey, labelled with the model. Weight-and-activation variants are left out of the lines (their
    activations change too) unless they are all there is.
    """
    lines = bit_width_lines(summary, variants)
    if lines.empty:
        raise ValueError("no single-step weight-quantization variant (uniform, gptq, awq) with a bit width")
    if lines["activation_bits"].isna().any():
        lines = lines[lines["activation_bits"].isna()]
    tasks = _tasks(lines)
    if not tasks:
        raise ValueError("the quantized variants have no task with a headline metric to plot")
    keys = ["model", "ft", "quantizer", "part", "position"]
    groups = sorted({tuple(r) for r in lines[keys].itertuples(index=False)})
    models = sorted({(g[0], g[1]) for g in groups})
    colour = {g: method_colour(g[2]) for g in groups}
    selections = sorted({(g[3], g[4]) for g in groups})
    style = {sel: _STYLES[i % len(_STYLES)] for i, sel in enumerate(selections)}
    marker = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(models)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.0), squeeze=False)
    for col, task in enumerate(tasks):
        ax = axes[0][col]
        metric, label = get_task(task).headline, get_task(task).headline_label
        rows = lines[lines["task"] == task]
        for g in groups:
            mine = rows[(rows[keys] == pd.Series(g, index=keys)).all(axis=1)].sort_values("bits")
            if mine.empty or metric not in mine.columns:
                continue
            ax.plot(
                mine["bits"],
                mine[metric],
                marker=marker[(g[0], g[1])],
                color=colour[g],
                linestyle=style[(g[3], g[4])],
                linewidth=1.5,
                label="/".join(map(str, g)),
            )
        baseline = summary[(summary["task"] == task) & (summary["variant"] == "baseline")]
        for model, ft in marker:
            base = baseline[(baseline["model"] == model) & (baseline["ft"] == ft)]
            if not base.empty and metric in base.columns and pd.notna(base[metric].iloc[0]):
                ax.axhline(float(base[metric].iloc[0]), color="gray", linestyle="--", linewidth=1)
                ax.annotate(
                    f"{model}/{ft} baseline",
                    (1.0, float(base[metric].iloc[0])),
                    xycoords=("axes fraction", "data"),
                    ha="right",
                    va="bottom",
                    fontsize=7,
                    color="gray",
                )
        bits = sorted(lines["bits"].dropna().unique())
        ax.set_xticks(bits, [f"{int(b)}" for b in bits])
        ax.set_xlabel("weight bits")
        ax.set_ylabel(label)
        ax.set_title(task)
        ax.grid(alpha=0.3)
    handles = [
        plt.Line2D(
            [],
            [],
            color=colour[g],
            linestyle=style[(g[3], g[4])],
            marker=marker[(g[0], g[1])],
            label="/".join(map(str, g)),
        )
        for g in groups
    ]
    handles.append(plt.Line2D([], [], color="gray", linestyle="--", label="baseline (not quantized)"))
    fig.tight_layout()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)
    return fig
