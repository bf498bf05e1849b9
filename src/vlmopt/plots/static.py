"""Quality-versus-size scatter and per-task bar charts of a study's summary table."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

__all__ = ["MAIN_METRIC", "METHOD_COLOURS", "method_colour", "quality_vs_size", "task_bars"]

#: The headline metric of each task, with its axis label.
MAIN_METRIC = {
    "captioning": ("CIDEr", "CIDEr"),
    "vqa": ("vqa_accuracy", "VQA accuracy (%)"),
    "retrieval": ("r_mean", "retrieval mean recall (%)"),
    "classification": ("top1", "top-1 accuracy (%)"),
    "real_vs_generated": ("accuracy", "real-vs-generated accuracy (%)"),
}

# Okabe-Ito first: distinguishable with the common colour-vision deficiencies.
PALETTE = [
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#F0E442",
    "#000000",
    # Beyond eight variants: Paul Tol's muted scheme, also colour-blind safe.
    "#882255",
    "#44AA99",
    "#999933",
    "#AA4499",
    "#332288",
    "#DDCC77",
]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]

#: One colour per compression method, the same in every figure (the summary's ``method`` column:
#: a variant's methods joined by "+", "none" for baselines and finetuned models).
METHOD_COLOURS = {
    "none": "#000000",
    "uniform": "#0072B2",
    "gptq": "#56B4E9",
    "awq": "#009E73",
    "dynamic_int8": "#E69F00",
    "precision": "#999933",
    "svd": "#CC79A7",
    "prune_layers": "#D55E00",
    "prune_heads": "#882255",
    "lora": "#44AA99",
}
# Methods combined in one variant ("prune_layers+lora"): colours left over, chosen from the name.
_COMBINED = ["#332288", "#DDCC77", "#AA4499", "#117733", "#88CCEE", "#661100"]


def method_colour(method: str | None) -> str:
    """The colour of a method (or of a "+"-joined sequence of methods) in every figure.

    A single method has a fixed colour; a combination gets one of the colours no single method
    uses, picked by a checksum of its name, so it is the same in every figure and every study.
    A missing method (older tables) counts as "none".
    """
    import zlib

    if method is None or (isinstance(method, float) and method != method):
        method = "none"
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    return _COMBINED[zlib.crc32(str(method).encode()) % len(_COMBINED)]


def _tasks(df: pd.DataFrame) -> list[str]:
    return [t for t in MAIN_METRIC if t in set(df["task"]) and MAIN_METRIC[t][0] in df.columns]


def _save(fig: plt.Figure, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    return out


def quality_vs_size(summary: pd.DataFrame, out: str | Path) -> Path:
    """One panel per task: headline metric against nominal model size, a colour per method, a
    marker per model, every variant labelled (the size row of
    :func:`~vlmopt.plots.tradeoffs.cost_figure`, with its Pareto front).

    The nominal size counts each weight at its bit width, so simulated quantization (whose file
    does not shrink) is placed where a real kernel would put it; the serialized size is in the table.
    """
    from vlmopt.plots.tradeoffs import cost_figure

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
        metric, label = MAIN_METRIC[task]
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
