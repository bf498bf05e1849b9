"""Quality-versus-size scatter and per-task bar charts of a study's summary table."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

__all__ = ["MAIN_METRIC", "quality_vs_size", "task_bars"]

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
    """One panel per task: headline metric against nominal model size, a colour per variant.

    The nominal size counts each weight at its bit width, so simulated quantization (whose file
    does not shrink) is placed where a real kernel would put it; the serialized size is in the table.
    """
    tasks = _tasks(summary)
    if not tasks:
        raise ValueError("summary has no task with a headline metric to plot")
    variants = sorted(summary["variant"].unique())
    colour = {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(variants)}
    models = sorted(summary["model"].unique())
    marker = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(models)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        metric, label = MAIN_METRIC[task]
        rows = summary[summary["task"] == task]
        size = rows["nominal_size_bytes"] if "nominal_size_bytes" in rows else rows["size_bytes"]
        for (_, r), nbytes in zip(rows.iterrows(), size, strict=True):
            filled = r["ft"] != "none"
            ax.scatter(
                nbytes / 1e6,
                r[metric],
                color=colour[r["variant"]] if filled else "none",
                edgecolors=colour[r["variant"]],
                marker=marker[r["model"]],
                s=60,
                linewidths=1.5,
            )
        ax.set_xlabel("nominal size (MB, weights at their bit width)")
        ax.set_ylabel(label)
        ax.set_title(f"{task}: quality vs size")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colour[v], marker="o", linestyle="", label=v) for v in variants]
    handles += [plt.Line2D([], [], color="gray", marker=marker[m], linestyle="", label=m) for m in models]
    handles += [
        plt.Line2D([], [], color="gray", marker="o", markerfacecolor="none", linestyle="", label="not finetuned")
    ]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _save(fig, out)


def task_bars(summary: pd.DataFrame, out: str | Path) -> Path:
    """One panel per task: headline metric of every model × finetune × variant as horizontal bars."""
    tasks = _tasks(summary)
    if not tasks:
        raise ValueError("summary has no task with a headline metric to plot")
    variants = sorted(summary["variant"].unique())
    colour = {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(variants)}
    keys = summary[["model", "ft", "variant"]].drop_duplicates().sort_values(["model", "ft", "variant"])
    names = [f"{r.model} / {r.ft} / {r.variant}" for r in keys.itertuples()]
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(3.5 + 4 * len(tasks), 0.35 * len(names) + 1.5), squeeze=False, sharey=True
    )
    for ax, task in zip(axes[0], tasks, strict=True):
        metric, label = MAIN_METRIC[task]
        values = keys.merge(summary[summary["task"] == task], on=["model", "ft", "variant"], how="left")[metric]
        bars = ax.barh(range(len(names)), values.fillna(0), color=[colour[v] for v in keys["variant"]])
        ax.bar_label(bars, labels=["" if pd.isna(v) else f"{v:.3g}" for v in values], fontsize=7, padding=2)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel(label)
        ax.set_title(task)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.12)
    axes[0][0].invert_yaxis()
    return _save(fig, out)
