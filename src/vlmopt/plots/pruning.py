"""Structural pruning: what dropping layers or attention heads costs in quality and saves in size and time.

The table puts every variant with a ``prune_layers`` or ``prune_heads`` step next to the unpruned
baseline of the same model, finetune, task and dataset (the baseline first), the way the RSICD
study reported BLIP-2 with Q-Former layers cut to 6 or 8 of 12 and OPT to 28 of 32, each followed
by LoRA recovery: the task's quality metrics, the parameter count and its change against the
baseline, latency and GFLOP per sample.

The figure has one row of panels per task and dataset with pruning variants. Each panel is a set of
horizontal bars, one per model / finetune / variant, the baseline at the top of its group and the
pruned variants below it, coloured by compression method (``method_colour``, the same in every
figure). From left to right: the task's headline metric (longer is better), the parameter count
(shorter is smaller; the change against the baseline is written beside it), the median latency per
sample and the GFLOP per sample (MFLOP for tiny models; shorter is cheaper). A dashed line marks the
baseline's value across its group, so a bar ending left of it is below the baseline; dotted lines
separate the models. Each bar's value is written at its end, "n/a" where it was not measured.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from vlmopt.plots.style import _save, method_colour, plt
from vlmopt.study import PRUNING_METHODS
from vlmopt.tasks import TASKS, get_task

__all__ = ["PRUNING_METHODS", "pruned_description", "pruning_figure", "pruning_plot", "pruning_table"]

_KEYS = ["model", "ft", "variant", "task", "dataset"]
_COSTS = ["latency_ms_per_sample_p50", "gflops_per_sample"]
_BASELINE = "baseline"


def _present(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value is not pd.NA


def _count(value: float, noun: str) -> str:
    n = int(value)
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _step_description(step: pd.Series) -> str:
    method = step.get("method")
    part = step.get("part") if _present(step.get("part")) else "model"
    position = step.get("position")
    where = part if not _present(position) or position == "all" else f"{part} ({position} layers)"
    if method == "prune_layers":
        if _present(step.get("drop_last")):
            return f"{part}: last {_count(step['drop_last'], 'layer')} dropped"
        if _present(step.get("keep")):
            return f"{part}: {_count(step['keep'], 'layer')} kept"
        if _present(step.get("n_layers")) and step["n_layers"] > 0:
            return f"{part}: {_count(step['n_layers'], 'layer')} dropped"
        return f"{part}: layers dropped"
    if method == "prune_heads":
        if _present(step.get("fraction")):
            return f"{where}: {float(step['fraction']) * 100:g}% of heads removed"
        return f"{where}: heads removed"
    if method == "lora":
        return f"LoRA r={int(step['r'])}" if _present(step.get("r")) else "LoRA"
    bits = step.get("bits")
    return f"{method} {int(bits)}-bit {part}" if _present(bits) else f"{method} {part}"


def pruned_description(steps: pd.DataFrame) -> str:
    """A short description of a variant's steps in order, e.g. ``"bridge: 6 layers kept + LoRA r=8"``.

    ``prune_layers``: "<part>: last N layers dropped" (``drop_last``), "<part>: N layers kept"
    (``keep``) or "<part>: N layers dropped" (an explicit list, counted by ``n_layers``);
    ``prune_heads``: "<part>: 50% of heads removed"; ``lora``: "LoRA r=8"; a variant without
    steps: "unpruned".
    """
    steps = steps[steps["method"] != "none"]
    if "step" in steps.columns:
        steps = steps.sort_values("step")
    if steps.empty:
        return "unpruned"
    return " + ".join(_step_description(s) for _, s in steps.iterrows())


def _params(efficiency: pd.DataFrame | None) -> pd.DataFrame:
    """Total parameters per (model, ft, variant, task, dataset), profiling-sweep rows left out."""
    if efficiency is None or efficiency.empty or "measure" not in efficiency.columns:
        return pd.DataFrame(columns=[*_KEYS, "params"])
    rows = efficiency[efficiency["measure"] == "params"]
    if "sweep_axis" in rows.columns:
        rows = rows[rows["sweep_axis"].isna()]
    keys = [k for k in _KEYS if k in rows.columns]
    return rows.groupby(keys, as_index=False, sort=False)["value"].first().rename(columns={"value": "params"})


def pruning_table(summary: pd.DataFrame, variants: pd.DataFrame, efficiency: pd.DataFrame | None) -> pd.DataFrame:
    """Pruning variants beside their unpruned baselines, one row per (model, ft, variant, task, dataset).

    Rows: every summary row whose variant has a ``prune_layers`` or ``prune_heads`` step, and the
    ``baseline`` row of each (model, ft, task, dataset) with such variants, which comes first in its
    group; groups in the task registry's order (captioning, vqa, ...), then dataset, model and finetune.
    Columns: model, ft, variant, task, dataset, method, pruned (:func:`pruned_description`), the
    tasks' quality metrics (:attr:`vlmopt.tasks.base.Task.metrics`) that have a value, params
    (efficiency measure ``params``), params_change (% against the group's baseline; negative: fewer),
    latency_ms_per_sample_p50 and gflops_per_sample. A measure that is missing is NaN.
    """
    vkeys = ["model", "ft", "variant"]
    pruned_keys = variants.loc[variants["method"].isin(PRUNING_METHODS), vkeys].drop_duplicates()
    columns = [*_KEYS, "method", "pruned"]
    rows = summary.merge(pruned_keys, on=vkeys, how="inner") if not pruned_keys.empty else summary.iloc[:0]
    if rows.empty:
        return pd.DataFrame(columns=[*columns, "params", "params_change", *_COSTS])
    groups = rows[["model", "ft", "task", "dataset"]].drop_duplicates()
    base = summary[summary["variant"] == _BASELINE].merge(groups, on=["model", "ft", "task", "dataset"], how="inner")
    table = pd.concat([base, rows], ignore_index=True).drop_duplicates(subset=_KEYS)

    steps = variants.merge(table[vkeys].drop_duplicates(), on=vkeys, how="inner")
    described = {key: pruned_description(g) for key, g in steps.groupby(vkeys, sort=False)}
    table["pruned"] = [described.get(k, "unpruned") for k in table[vkeys].itertuples(index=False, name=None)]
    if "method" not in table.columns:
        real = steps[steps["method"] != "none"].sort_values("step")
        joined = {key: "+".join(g["method"]) for key, g in real.groupby(vkeys, sort=False)}
        table["method"] = [joined.get(k, "none") for k in table[vkeys].itertuples(index=False, name=None)]
    table["method"] = table["method"].fillna("none")

    params = _params(efficiency)
    by_variant = params.groupby(vkeys, sort=False)["params"].first().rename("params_any")
    on = [k for k in _KEYS if k in params.columns]
    table = table.merge(params, on=on, how="left") if len(on) == len(_KEYS) else table.assign(params=np.nan)
    table = table.merge(by_variant, on=vkeys, how="left")
    table["params"] = table["params"].astype(float).fillna(table["params_any"].astype(float))
    table = table.drop(columns="params_any")

    order = {t: i for i, t in enumerate(TASKS)}
    table["_task"] = table["task"].map(order).fillna(len(order))
    table["_base"] = table["variant"] != _BASELINE
    table = table.sort_values(["_task", "task", "dataset", "model", "ft", "_base", "variant"], kind="stable")
    table = table.drop(columns=["_task", "_base"]).reset_index(drop=True)

    baseline = table[table["variant"] == _BASELINE].set_index(["model", "ft", "task", "dataset"])["params"]
    ref = pd.Series(
        [baseline.get(k, np.nan) for k in table[["model", "ft", "task", "dataset"]].itertuples(index=False, name=None)],
        index=table.index,
        dtype=float,
    )
    table["params_change"] = (table["params"] / ref - 1.0) * 100.0

    metrics = []
    for task in dict.fromkeys(table["task"]):
        for m in TASKS[task].metrics if task in TASKS else ():
            if m in table.columns and m not in metrics and table[m].notna().any():
                metrics.append(m)
    for cost in _COSTS:
        if cost not in table.columns:
            table[cost] = np.nan
    return table[[*columns, *metrics, "params", "params_change", *_COSTS]]


def _param_unit(values: pd.Series) -> tuple[float, str]:
    """Scale and name of the unit that keeps the largest parameter count between 1 and 1000."""
    largest = float(values.max()) if values.notna().any() else 0.0
    for scale, name in ((1e9, "billions"), (1e6, "millions"), (1e3, "thousands")):
        if largest >= scale:
            return scale, name
    return 1.0, "count"


def _flop_unit(values: pd.Series) -> tuple[float, str]:
    """GFLOP, or MFLOP where every value is below 0.1 GFLOP (tiny models)."""
    largest = float(values.max()) if values.notna().any() else 0.0
    return (1.0, "GFLOP") if largest >= 0.1 or largest == 0.0 else (1e-3, "MFLOP")


def _bars(ax: plt.Axes, values: pd.Series, colours: list[str], labels: list[str], pad: float) -> None:
    y = np.arange(len(values))
    widths = values.to_numpy(dtype=float)
    bars = ax.barh(y, np.nan_to_num(widths), color=colours, height=0.7, zorder=2)
    texts = ax.bar_label(bars, labels=labels, fontsize=7, padding=2, zorder=4)
    for text in texts:  # the baseline's dashed line passes behind the value, not through it
        text.set_bbox({"facecolor": "white", "edgecolor": "none", "pad": 0.3, "alpha": 0.85})
    finite = widths[np.isfinite(widths)]
    top = float(finite.max()) if finite.size else 0.0
    ax.set_xlim(0, top * (1 + pad) if top > 0 else 1.0)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.grid(axis="x", alpha=0.3)


def _baseline_marks(ax: plt.Axes, values: pd.Series, mine: pd.DataFrame) -> None:
    """A dashed line at each baseline's value, across its model / finetune's bars."""
    start = 0
    for i in range(1, len(mine) + 1):
        if i < len(mine) and tuple(mine.loc[i, ["model", "ft"]]) == tuple(mine.loc[start, ["model", "ft"]]):
            continue
        base = [j for j in range(start, i) if mine.loc[j, "variant"] == _BASELINE]
        if base and np.isfinite(values.iloc[base[0]]) and i - start > 1:
            ax.vlines(
                values.iloc[base[0]], start - 0.45, i - 0.55, colors="dimgray", linestyles="--", linewidth=0.9, zorder=3
            )
        if i < len(mine):
            ax.axhline(i - 0.5, color="gray", linewidth=0.8, linestyle=":")
        start = i


def _fmt(v: float) -> str:
    if not np.isfinite(v):
        return "n/a"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def pruning_figure(summary: pd.DataFrame, variants: pd.DataFrame, efficiency: pd.DataFrame | None) -> plt.Figure:
    """One row of bar panels per task and dataset with pruning variants (see the module docstring).

    Bars, top to bottom, follow :func:`pruning_table` (each model / finetune's baseline first);
    panels: the task's headline metric, parameters (in thousands, millions or
    billions, whichever reads best; the change against the baseline beside each pruned bar),
    latency per sample (ms, median) and GFLOP per sample. Raises ``ValueError`` when the summary
    has no pruning variant with a headline metric.
    """
    table = pruning_table(summary, variants, efficiency)
    if table.empty:
        raise ValueError("summary has no pruning variants (prune_layers or prune_heads) to plot")
    rows = [
        (task, dataset)
        for task, dataset in table[["task", "dataset"]].drop_duplicates().itertuples(index=False, name=None)
        if task in TASKS and TASKS[task].headline in table.columns
    ]
    if not rows:
        raise ValueError("summary has no pruning variants with a task headline metric to plot")
    counts = [int(((table["task"] == t) & (table["dataset"] == d)).sum()) for t, d in rows]
    heights = [0.42 * n + 1.1 for n in counts]
    fig, axes = plt.subplots(
        len(rows),
        4,
        figsize=(15.5, sum(heights)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights, "wspace": 0.08},
        layout="constrained",
    )
    for (task, dataset), axs in zip(rows, axes, strict=True):
        mine = table[(table["task"] == task) & (table["dataset"] == dataset)].reset_index(drop=True)
        colours = [method_colour(m) for m in mine["method"]]
        names = [f"{m} / {f} / {v}\n{p}" for m, f, v, p in mine[["model", "ft", "variant", "pruned"]].values]
        metric, metric_label = get_task(task).headline, get_task(task).headline_label
        scale, unit = _param_unit(mine["params"])
        params = mine["params"] / scale
        flop_scale, flop_unit = _flop_unit(mine[_COSTS[1]])
        flops = mine[_COSTS[1]] / flop_scale
        change = [
            _fmt(p) if v == _BASELINE or not np.isfinite(c) else f"{_fmt(p)} ({c:+.1f}%)"
            for p, c, v in zip(params, mine["params_change"], mine["variant"], strict=True)
        ]
        panels = [
            (mine[metric], [_fmt(v) for v in mine[metric]], metric_label, 0.22),
            (params, change, f"parameters ({unit})", 0.55),
            (mine[_COSTS[0]], [_fmt(v) for v in mine[_COSTS[0]]], "latency per sample (ms, median)", 0.22),
            (flops, [_fmt(v) for v in flops], f"{flop_unit} per sample", 0.22),
        ]
        for c, (ax, (values, labels, xlabel, pad)) in enumerate(zip(axs, panels, strict=True)):
            _bars(ax, values, colours, labels, pad)
            ax.set_yticks(range(len(mine)), names if c == 0 else [""] * len(mine), fontsize=7.5)
            ax.set_ylim(len(mine) - 0.5, -0.5)
            ax.set_xlabel(xlabel, fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
            _baseline_marks(ax, values, mine)
        axs[0].set_title(f"{task} on {dataset}: {metric_label}", fontsize=9, loc="left")
        axs[1].set_title("parameters (change vs baseline)", fontsize=9, loc="left")
        axs[2].set_title("latency", fontsize=9, loc="left")
        axs[3].set_title("compute", fontsize=9, loc="left")
    fig.suptitle("Pruned variants against their unpruned baselines", fontsize=11)
    methods = list(dict.fromkeys(table["method"]))
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=method_colour(m), label="none (baseline)" if m == "none" else m)
        for m in methods
    ]
    fig.legend(handles=handles, title="method", loc="outside right center", frameon=False, fontsize=8)
    return fig


def pruning_plot(
    summary: pd.DataFrame, variants: pd.DataFrame, efficiency: pd.DataFrame | None, out: str | Path
) -> Path:
    """:func:`pruning_figure` saved as a PNG at ``out``."""
    return _save(pruning_figure(summary, variants, efficiency), out)
