"""The profiling sweep's figure: cost against each swept setting (vlmopt.profiling.sweep)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from vlmopt.plots.style import PALETTE, _save, plt
from vlmopt.study import AXES, NUMERIC_AXES

__all__ = ["SCALING_MEASURES", "scaling_curves", "sweep_table"]

#: Measures drawn against each axis (a row of panels each, when any sweep point has a value).
SCALING_MEASURES = {
    "latency_ms_per_sample_p50": "latency per sample (ms, median)",
    "gflops_per_sample": "GFLOP per sample",
    "energy_j_per_sample": "energy per sample (J)",
    "peak_mem_delta_mb": "peak memory above start (MiB)",
}
_AXIS_LABEL = {
    "image_size": "longest image side (px)",
    "prompt_length": "prompt length (text tokens)",
    "batch_size": "batch size",
    "dtype": "dtype",
    "attn_implementation": "attention",
    "compile": "torch.compile",
}
_SERIES = ["model", "ft", "variant", "task"]


def sweep_table(efficiency: pd.DataFrame) -> pd.DataFrame:
    """Sweep rows, wide: one row per (model, ft, variant, task, axis, value) with measures as columns
    (None where the point was not measured) and ``note`` (why, for a point that was not)."""
    if "sweep_axis" not in efficiency.columns:
        return pd.DataFrame(columns=[*_SERIES, "sweep_axis", "sweep_value"])
    rows = efficiency[efficiency["sweep_axis"].notna()]
    keys = [*_SERIES, "sweep_axis", "sweep_value"]
    wide = rows.drop_duplicates([*keys, "measure"]).set_index([*keys, "measure"])["value"].unstack("measure")
    wide = wide.reset_index()
    wide.columns.name = None
    notes = rows[rows["measure"] == "latency_ms_p50"].set_index(keys)["note"]
    return wide.merge(notes.rename("note").reset_index(), on=keys, how="left")


def _order(axis: str, values: pd.Series) -> list[str]:
    unique = list(dict.fromkeys(values))
    if axis in NUMERIC_AXES:
        return sorted(unique, key=float)
    known = {"dtype": ["float32", "bfloat16", "float16"], "compile": ["false", "true"]}.get(axis, [])
    return sorted(unique, key=lambda v: (known.index(v) if v in known else len(known), v))


def scaling_curves(efficiency: pd.DataFrame, out: str | Path) -> Path:
    """One column of panels per swept axis, one row per measure with values.

    Numeric axes (image size, prompt length, batch size) are curves, one line per (model,
    finetune, variant, task); dtype, attention and compile are grouped bars. A point that could not
    be measured (flash attention without flash_attn, a part that keeps its attention) is marked
    "n/a" at the bottom of its bar slot; the efficiency table's note says why.
    """
    table = sweep_table(efficiency)
    if table.empty:
        raise ValueError("the efficiency table has no sweep rows: the study has no profiling.sweep")
    axes_present = [a for a in AXES if a in set(table["sweep_axis"])]
    measures = [m for m in SCALING_MEASURES if m in table.columns and table[m].notna().any()]
    if not measures:
        raise ValueError(f"no sweep point has a value of any of {list(SCALING_MEASURES)}")
    series = sorted({tuple(r) for r in table[_SERIES].itertuples(index=False)})
    colour = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(series)}
    fig, grid = plt.subplots(
        len(measures), len(axes_present), figsize=(4.4 * len(axes_present), 3.4 * len(measures)), squeeze=False
    )
    for col, axis in enumerate(axes_present):
        rows = table[table["sweep_axis"] == axis]
        order = _order(axis, rows["sweep_value"])
        for r, measure in enumerate(measures):
            ax = grid[r][col]
            width = 0.8 / max(1, len(series))
            for i, s in enumerate(series):
                mine = rows[(rows[_SERIES] == pd.Series(s, index=_SERIES)).all(axis=1)]
                if mine.empty:
                    continue
                y = mine.set_index("sweep_value")[measure].reindex(order).astype(float)
                if axis in NUMERIC_AXES:
                    x = np.array([float(v) for v in order])
                    ok = ~np.isnan(y.to_numpy())
                    ax.plot(x[ok], y.to_numpy()[ok], marker="o", color=colour[s], linewidth=1.5)
                else:
                    pos = np.arange(len(order)) + (i - (len(series) - 1) / 2) * width
                    ax.bar(pos, np.nan_to_num(y.to_numpy()), width=width, color=colour[s])
                    for p, v in zip(pos, y.to_numpy(), strict=True):
                        if np.isnan(v):
                            ax.annotate("n/a", (p, 0), ha="center", va="bottom", fontsize=7, rotation=90)
            if axis in NUMERIC_AXES:
                values = [float(v) for v in order]
                if values and min(values) > 0 and max(values) / min(values) >= 8:
                    ax.set_xscale("log", base=2)
                ax.set_xticks(values, order)
            else:
                ax.set_xticks(np.arange(len(order)), order)
            # From zero: run-to-run noise of a few percent must not look like a trend.
            ax.set_ylim(bottom=0)
            ax.set_ylabel(SCALING_MEASURES[measure])
            if r == len(measures) - 1:
                ax.set_xlabel(_AXIS_LABEL[axis])
            if r == 0:
                ax.set_title(axis)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    handles = [plt.Line2D([], [], color=colour[s], marker="o", label="/".join(s)) for s in series]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)
    return _save(fig, out)
