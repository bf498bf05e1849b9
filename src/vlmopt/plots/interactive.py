"""Interactive 3-D drop-off view of the quantization grid study (an HTML page drawn with plotly).

Each point is a weight-quantized variant (or the unquantized baseline) placed at the bit widths of
its three model parts: x = vision encoder, y = bridge (the BLIP-2 Q-Former), z = language model.
Its colour is the task's headline metric, on one colour scale per task and dataset; the colour bar
on the right gives the scale. A dropdown picks the task and dataset; the marker symbol tells the
models apart (legend). A part that no step quantizes keeps its float32 weights and sits at 32 bits,
so the baseline is the corner at 32/32/32 and quality drops off towards the origin. The bit axes
are logarithmic, with ticks at the bit widths present. Variants with the same three bit widths
(say GPTQ, AWQ and round-to-nearest at 3 bits) are drawn slightly apart around their common
point; hovering over a point shows its variant, its exact bit widths and its metric value, and names
the positions and roles when a step quantized only part of a model part.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from vlmopt.parts import PARTS
from vlmopt.plots.style import _tasks
from vlmopt.study import QUANTIZERS
from vlmopt.tasks import TASKS, get_task

__all__ = ["FULL_BITS", "PARTS", "WEIGHT_QUANTIZERS", "bits_by_part", "dropoff_3d", "dropoff_3d_figure"]

#: Weight-only quantization methods (a step of one of them with ``activation_bits`` is left out).
WEIGHT_QUANTIZERS = QUANTIZERS
#: The model parts on the three axes, in x, y, z order.
#: The width of a part that no step quantizes (float32 weights).
FULL_BITS = 32.0

AXIS_TITLES = {"vision": "vision bits", "bridge": "bridge (Q-Former) bits", "language": "language bits"}
# The marker symbols a 3-D scatter has: filled ones first.
SYMBOLS = ["circle", "square", "diamond", "cross", "x", "circle-open", "square-open", "diamond-open"]
# Points with identical bit widths are spread on a circle of this radius (decades, in the x-y plane),
# widened for more than three points.
DODGE = 0.05
_KEYS = ["model", "ft", "variant"]
_ROW_KEYS = ["model", "ft", "variant", "task", "dataset"]
_TRACE_KEYS = ["task", "dataset", "model", "ft"]


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _bits_label(bits: float) -> str:
    return f"{bits:g}"


def _step_targets(part: object) -> list[str] | None:
    """The parts a step quantizes ("all" = every part; "+"-joined parts); None for an unknown part."""
    names = ["all"] if _missing(part) else str(part).split("+")
    if "all" in names:
        return list(PARTS)
    return names if all(n in PARTS for n in names) else None


def _variant_bits(steps: pd.DataFrame) -> dict[str, object] | None:
    """Bits per part, the methods and a note on partial coverage of one variant's steps.

    None when the variant is not a pure weight quantization (another method, activation bits, a step
    without bits or on an unknown part).
    """
    methods = list(dict.fromkeys(steps["method"].astype(str)))
    if methods == ["none"]:
        return {**{f"{p}_bits": FULL_BITS for p in PARTS}, "method": "none", "detail": ""}
    if not set(methods) <= set(WEIGHT_QUANTIZERS):
        return None
    if "activation_bits" in steps and steps["activation_bits"].notna().any():
        return None
    if "bits" not in steps or steps["bits"].isna().any():
        return None
    entries: dict[str, list[tuple[float, str, str]]] = {p: [] for p in PARTS}
    for step in steps.sort_values("step").to_dict("records"):
        targets = _step_targets(step.get("part"))
        if targets is None:
            return None
        position = step.get("position")
        position = "all" if _missing(position) else str(position)
        role = step.get("role")
        role = "all" if _missing(role) or str(role) == "both" else str(role)
        for part in targets:
            entries[part].append((float(step["bits"]), position, role))
    out: dict[str, object] = {}
    notes = []
    for part in PARTS:
        mine = entries[part]
        out[f"{part}_bits"] = min((b for b, _, _ in mine), default=FULL_BITS)
        if any(pos != "all" or role != "all" for _, pos, role in mine):
            where = [
                f"{_bits_label(b)} bits at {pos.replace('+', ', ')} layers" + ("" if role == "all" else f" ({role})")
                for b, pos, role in mine
            ]
            rest = "" if any(pos == "all" and role == "all" for _, pos, role in mine) else "; other weights at 32 bits"
            notes.append(f"{part}: " + "; ".join(where) + rest)
    out["method"] = "+".join(methods)
    out["detail"] = "\n".join(notes)
    return out


def bits_by_part(summary: pd.DataFrame, variants: pd.DataFrame) -> pd.DataFrame:
    """The bit width of each model part and the headline metric of every weight-quantized variant.

    One row per (model, ft, variant, task, dataset) whose compression steps are only weight
    quantization (methods uniform, gptq, awq, no ``activation_bits``), plus the baselines (variants
    without steps, method "none"). Columns: model, ft, variant, task, dataset, vision_bits,
    bridge_bits, language_bits, metric (the task's headline metric column), value, method (the
    steps' methods joined by "+") and detail (where a step quantized only some positions or roles
    of a part: which, at which bits, a line per part; empty otherwise).

    A step on part "all" sets the three parts; a part no step quantizes keeps float32 weights
    (:data:`FULL_BITS`); a part quantized more than once, or only at some positions, gets the lowest
    of its steps' bit widths. Rows without a value of their headline metric are left out.
    """
    columns = [*_ROW_KEYS, *(f"{p}_bits" for p in PARTS), "metric", "value", "method", "detail"]
    rows = []
    for key, steps in variants.groupby(_KEYS, sort=True):
        bits = _variant_bits(steps)
        if bits is not None:
            rows.append({**dict(zip(_KEYS, key, strict=True)), **bits})
    if not rows:
        return pd.DataFrame(columns=columns)
    bits = pd.DataFrame(rows)
    frames = []
    for task in _tasks(summary):
        metric = get_task(task).headline
        scored = summary.loc[summary["task"] == task, [*_ROW_KEYS, metric]].rename(columns={metric: "value"})
        frames.append(scored.assign(metric=metric))
    if not frames:
        return pd.DataFrame(columns=columns)
    scored = pd.concat(frames, ignore_index=True)
    scored = scored[scored["value"].notna()]
    out = scored.merge(bits, on=_KEYS, how="inner")[columns]
    out["value"] = out["value"].astype(float)
    return out.sort_values([*_TRACE_KEYS, "variant"], ignore_index=True)


def _dodged(rows: pd.DataFrame) -> tuple[list[float], list[float]]:
    """x and y of each row: variants sharing all three bit widths are spread on a small circle."""
    xs = rows["vision_bits"].astype(float).tolist()
    ys = rows["bridge_bits"].astype(float).tolist()
    same = rows.groupby([f"{p}_bits" for p in PARTS], sort=False).indices
    for positions in same.values():
        if len(positions) < 2:
            continue
        radius = DODGE * max(1.0, math.sqrt(len(positions) / 3))
        for i, pos in enumerate(sorted(positions)):
            angle = 2 * math.pi * i / len(positions) + math.pi / 4
            xs[pos] *= 10 ** (radius * math.cos(angle))
            ys[pos] *= 10 ** (radius * math.sin(angle))
    return xs, ys


def _hover(row: dict[str, object], label: str) -> str:
    bits = " · ".join(f"{p} {_bits_label(float(row[f'{p}_bits']))}" for p in PARTS)
    lines = [
        f"<b>{row['variant']}</b> ({row['method']})",
        f"{row['model']} / ft {row['ft']}",
        f"bits: {bits}",
        f"{label}: {float(row['value']):.4g}",
    ]
    if not _missing(row["change"]) and row["method"] != "none":
        lines.append(f"change vs its baseline: {float(row['change']):+.3g}")
    if row["detail"]:
        lines.extend(str(row["detail"]).split("\n"))
    return "<br>".join(lines)


def _scale(values: pd.Series) -> tuple[float, float]:
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        pad = max(abs(lo) * 0.01, 0.5)
        lo, hi = lo - pad, hi + pad
    return lo, hi


def _with_change(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with ``change``: value minus the baseline of the same model, ft, task and dataset."""
    base = table[table["method"] == "none"]
    base = base.assign(named=base["variant"] != "baseline").sort_values("named")
    base = base.drop_duplicates(_TRACE_KEYS)[[*_TRACE_KEYS, "value"]].rename(columns={"value": "base"})
    out = table.merge(base, on=_TRACE_KEYS, how="left")
    return out.assign(change=out["value"] - out["base"]).drop(columns="base")


def dropoff_3d_figure(summary: pd.DataFrame, variants: pd.DataFrame) -> go.Figure:
    """The 3-D drop-off view: quality against the bit widths of vision encoder, bridge and language model.

    One ``Scatter3d`` trace per (task, dataset, model, ft) that has at least one weight-quantized
    variant (its baseline joins it as the 32/32/32 reference); a dropdown shows the traces of one
    task and dataset at a time. The marker colour is the headline metric (viridis, one scale per
    task and dataset, with a colour bar titled with the metric's axis label), the symbol the model.
    Where every trace has its baseline, a second menu switches the colour to the change against
    the trace's own baseline (so models of different quality level share one readable scale).
    x and y hold the drawn positions (see :data:`DODGE`); ``customdata`` holds the exact bits and
    the value.
    """
    table = bits_by_part(summary, variants)
    quantized = table[table["method"] != "none"]
    if quantized.empty:
        raise ValueError(
            "summary has no weight-quantized variants (uniform, gptq or awq without activation_bits) "
            "with a headline metric"
        )
    table = table.merge(quantized[_TRACE_KEYS].drop_duplicates(), on=_TRACE_KEYS, how="inner")
    table = _with_change(table)
    order = {t: i for i, t in enumerate(TASKS)}
    groups = sorted(table[["task", "dataset"]].drop_duplicates().itertuples(index=False, name=None))
    groups.sort(key=lambda g: order[g[0]])
    models = sorted(table["model"].unique())
    symbol = {m: SYMBOLS[i % len(SYMBOLS)] for i, m in enumerate(models)}

    fig = go.Figure()
    owner: list[int] = []
    by_value: dict[str, list[object]] = {"marker.color": [], "marker.cmin": [], "marker.cmax": [], "title": []}
    by_change: dict[str, list[object]] = {k: [] for k in by_value}
    for g, (task, dataset) in enumerate(groups):
        label = get_task(task).headline_label
        rows = table[(table["task"] == task) & (table["dataset"] == dataset)].reset_index(drop=True)
        lo, hi = _scale(rows["value"])
        change_lo, change_hi = _scale(rows["change"].dropna()) if rows["change"].notna().any() else (-1.0, 1.0)
        xs, ys = _dodged(rows)
        rows = rows.assign(x=xs, y=ys)
        for t, ((model, ft), mine) in enumerate(rows.groupby(["model", "ft"], sort=True)):
            records = mine.to_dict("records")
            fig.add_trace(
                go.Scatter3d(
                    x=mine["x"].tolist(),
                    y=mine["y"].tolist(),
                    z=mine["language_bits"].astype(float).tolist(),
                    mode="markers",
                    name=f"{model} / ft {ft}",
                    legendgroup=f"{model} / {ft}",
                    text=[_hover(r, label) for r in records],
                    hovertemplate="%{text}<extra></extra>",
                    customdata=mine[[*(f"{p}_bits" for p in PARTS), "value"]].to_numpy(dtype=float),
                    visible=g == 0,
                    marker=dict(
                        symbol=symbol[model],
                        size=7,
                        color=mine["value"].tolist(),
                        colorscale="Viridis",
                        cmin=lo,
                        cmax=hi,
                        showscale=t == 0,
                        colorbar=dict(title=dict(text=label, side="right"), x=1.0, len=0.75, thickness=18),
                        line=dict(width=0.5, color="#333333"),
                    ),
                )
            )
            owner.append(g)
            for target, values, low, high, text in (
                (by_value, mine["value"], lo, hi, label),
                (by_change, mine["change"], change_lo, change_hi, f"{label}: change vs baseline"),
            ):
                target["marker.color"].append(values.tolist())
                target["marker.cmin"].append(low)
                target["marker.cmax"].append(high)
                target["title"].append(text)

    present = sorted({float(b) for p in PARTS for b in table[f"{p}_bits"]})
    low, high = math.log10(min(present)), math.log10(max(present))
    span = [low - 0.12, high + 0.12]
    ticktext = [_bits_label(b) + (" (fp32)" if b == FULL_BITS else "") for b in present]
    axes = {
        axis: dict(
            title=dict(text=AXIS_TITLES[part]),
            type="log",
            range=span,
            tickmode="array",
            tickvals=present,
            ticktext=ticktext,
            backgroundcolor="#f4f4f4",
            gridcolor="#d0d0d0",
        )
        for axis, part in zip(("xaxis", "yaxis", "zaxis"), PARTS, strict=True)
    }

    def title(task: str, dataset: str) -> str:
        return f"Quality vs bit width per model part: {task} on {dataset}"

    menu = dict(direction="down", showactive=True, active=0, x=0.0, xanchor="left", yanchor="top")
    menus = [
        dict(
            **menu,
            y=1.0,
            buttons=[
                dict(
                    label=f"{task} / {dataset}",
                    method="update",
                    args=[{"visible": [o == g for o in owner]}, {"title.text": title(task, dataset)}],
                )
                for g, (task, dataset) in enumerate(groups)
            ],
        )
    ]
    if table["change"].notna().all():
        menus.append(
            dict(
                **menu,
                y=0.92,
                buttons=[
                    dict(
                        label=name,
                        method="restyle",
                        args=[
                            {
                                **{k: v for k, v in colours.items() if k != "title"},
                                "marker.colorbar.title.text": colours["title"],
                            }
                        ],
                    )
                    for name, colours in (("colour: metric", by_value), ("colour: change vs baseline", by_change))
                ],
            )
        )
    fig.update_layout(
        title=dict(text=title(*groups[0]), x=0.5, xanchor="center"),
        scene=dict(**axes, aspectmode="cube", camera=dict(eye=dict(x=1.6, y=1.6, z=1.0))),
        updatemenus=menus,
        legend=dict(title=dict(text="model / finetune"), x=0.0, xanchor="left", y=0.82, yanchor="top"),
        annotations=[
            dict(
                text=(
                    "32 bits = not quantized (float32 weights). Points with the same three bit widths are "
                    "drawn slightly apart; hover for a variant's exact bits and value."
                ),
                showarrow=False,
                xref="paper",
                yref="paper",
                x=0.5,
                y=0.0,
                xanchor="center",
                yanchor="top",
                font=dict(size=12, color="#555555"),
            )
        ],
        height=720,
        margin=dict(l=10, r=10, t=60, b=40),
        template="plotly_white",
    )
    return fig


def dropoff_3d(summary: pd.DataFrame, variants: pd.DataFrame, out: str | Path) -> Path:
    """:func:`dropoff_3d_figure` written as one self-contained HTML page (plotly.js inline, once).

    The page opens offline; it is written to a temporary name next to ``out`` and then renamed.
    """
    fig = dropoff_3d_figure(summary, variants)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    html = fig.to_html(
        include_plotlyjs=True,
        include_mathjax=False,
        full_html=True,
        config={"displaylogo": False, "responsive": True},
    )
    charset = '<meta charset="utf-8" />'
    anchor = charset if charset in html else "<head>"
    html = html.replace(anchor, f"{anchor}\n    <title>Quality vs bit width per model part</title>", 1)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    try:
        tmp.write_text(html, encoding="utf-8")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
