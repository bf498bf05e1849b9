"""The interactive 3-D drop-off view: bits per part, the plotly figure and the self-contained HTML page."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from vlmopt.plots.interactive import DODGE, bits_by_part, dropoff_3d, dropoff_3d_figure

NAN = float("nan")


def _step(model: str, variant: str, step: int, method: str, part: str | None = "all", **kw: object) -> dict:
    row = dict(
        model=model,
        ft="full",
        variant=variant,
        step=step,
        method=method,
        part=part,
        position="all",
        role="both",
        bits=NAN,
        activation_bits=NAN,
    )
    row.update(kw)
    return row


def _variants() -> pd.DataFrame:
    q2 = "blip2"
    rows = [
        _step(q2, "baseline", -1, "none", part=None, position=None, role=None),
        _step(q2, "w4-vision", 0, "uniform", "vision", bits=4.0),
        _step(q2, "w3-all", 0, "gptq", "all", bits=3.0),
        # Position-limited: language 2 bits at the first layers, 4 bits at the last layers.
        _step(q2, "lang-first-last", 0, "uniform", "language", bits=2.0, position="first"),
        _step(q2, "lang-first-last", 1, "uniform", "language", bits=4.0, position="last"),
        # Mixed: vision 8 bits (uniform), bridge 4 bits (gptq), then language 3 bits (awq).
        _step(q2, "mixed", 0, "uniform", "vision", bits=8.0),
        _step(q2, "mixed", 1, "gptq", "bridge", bits=4.0),
        _step(q2, "mixed", 2, "awq", "language", bits=3.0),
        # Two variants at the same bits (drawn apart).
        _step(q2, "rtn-l3", 0, "uniform", "language", bits=3.0),
        _step(q2, "awq-l3", 0, "awq", "language", bits=3.0),
        # Left out: activations quantized, a non-quantization step, another method.
        _step(q2, "w8a8", 0, "uniform", "language", bits=8.0, activation_bits=8.0),
        _step(q2, "prune-w4", 0, "prune_layers", "language", keep=1.0),
        _step(q2, "prune-w4", 1, "uniform", "language", bits=4.0),
        _step(q2, "bf16", 0, "precision", "all", dtype="bfloat16"),
        # A second model with one quantized variant (captioning only).
        _step("blip", "baseline", -1, "none", part=None, position=None, role=None),
        _step("blip", "w8-lang", 0, "uniform", "language", bits=8.0),
        # A model with baselines only: nothing to draw for it.
        _step("clip", "baseline", -1, "none", part=None, position=None, role=None),
    ]
    return pd.DataFrame(rows)


Q2_VARIANTS = ["baseline", "w4-vision", "w3-all", "lang-first-last", "mixed", "rtn-l3", "awq-l3", "w8a8", "prune-w4"]
Q2_VARIANTS += ["bf16"]


def _summary() -> pd.DataFrame:
    rows = []
    for i, variant in enumerate(Q2_VARIANTS):
        rows.append(dict(model="blip2", ft="full", variant=variant, task="captioning", dataset="shapes", CIDEr=1.0 + i))
        rows.append(
            dict(model="blip2", ft="full", variant=variant, task="vqa", dataset="shapes", vqa_accuracy=50.0 + i)
        )
    rows.append(dict(model="blip", ft="full", variant="baseline", task="captioning", dataset="shapes", CIDEr=0.5))
    rows.append(dict(model="blip", ft="full", variant="w8-lang", task="captioning", dataset="shapes", CIDEr=0.25))
    rows.append(dict(model="clip", ft="full", variant="baseline", task="classification", dataset="colors", top1=90.0))
    return pd.DataFrame(rows)


def _bits(table: pd.DataFrame, model: str, variant: str, task: str = "captioning") -> tuple[float, float, float]:
    row = table[(table["model"] == model) & (table["variant"] == variant) & (table["task"] == task)]
    assert len(row) == 1
    return tuple(row[["vision_bits", "bridge_bits", "language_bits"]].iloc[0])


def test_bits_by_part_rows_and_bits():
    table = bits_by_part(_summary(), _variants())
    assert list(table.columns[:10]) == [
        "model",
        "ft",
        "variant",
        "task",
        "dataset",
        "vision_bits",
        "bridge_bits",
        "language_bits",
        "metric",
        "value",
    ]
    q2 = table[(table["model"] == "blip2") & (table["task"] == "captioning")]
    assert sorted(q2["variant"]) == sorted(
        ["baseline", "w4-vision", "w3-all", "lang-first-last", "mixed", "rtn-l3", "awq-l3"]
    )
    assert _bits(table, "blip2", "baseline") == (32.0, 32.0, 32.0)
    assert _bits(table, "blip2", "w4-vision") == (4.0, 32.0, 32.0)
    assert _bits(table, "blip2", "w3-all") == (3.0, 3.0, 3.0)
    assert _bits(table, "blip2", "lang-first-last") == (32.0, 32.0, 2.0)
    assert _bits(table, "blip2", "mixed", task="vqa") == (8.0, 4.0, 3.0)
    assert _bits(table, "blip", "w8-lang") == (32.0, 32.0, 8.0)
    # Metric and value: the task's headline metric of that row.
    mixed = table[(table["variant"] == "mixed")].set_index("task")
    assert mixed.loc["captioning", "metric"] == "CIDEr"
    assert mixed.loc["captioning", "value"] == 1.0 + Q2_VARIANTS.index("mixed")
    assert mixed.loc["vqa", "metric"] == "vqa_accuracy"
    assert mixed.loc["vqa", "value"] == 50.0 + Q2_VARIANTS.index("mixed")
    assert mixed.loc["vqa", "method"] == "uniform+gptq+awq"
    # The position-limited variant names its positions; a whole-part variant has no note.
    detail = table.loc[table["variant"] == "lang-first-last", "detail"].iloc[0]
    assert "2 bits at first" in detail and "4 bits at last" in detail and detail.startswith("language")
    assert table.loc[table["variant"] == "w3-all", "detail"].iloc[0] == ""
    # The clip baseline is a baseline row (the figure leaves it out, not this table).
    assert _bits(table, "clip", "baseline", task="classification") == (32.0, 32.0, 32.0)
    assert len(table) == 7 * 2 + 2 + 1


def test_figure_traces_points_colours_and_hover():
    summary, variants = _summary(), _variants()
    fig = dropoff_3d_figure(summary, variants)
    # captioning: blip, blip2; vqa: blip2. The baseline-only clip is left out.
    assert [(d.name, d.visible) for d in fig.data] == [
        ("blip / ft full", True),
        ("blip2 / ft full", True),
        ("blip2 / ft full", False),
    ]
    assert all(d.type == "scatter3d" for d in fig.data)
    blip, q2cap, q2vqa = fig.data
    assert list(blip.z) == [32.0, 8.0]
    # blip's baseline shares 32/32/32 with blip2's: both drawn off the corner; w8-lang sits on its bits.
    assert (blip.x[1], blip.y[1]) == (32.0, 32.0)
    assert blip.x[0] != 32.0 and abs(math.log10(blip.x[0] / 32)) <= DODGE + 1e-9
    assert list(blip.marker.color) == [0.5, 0.25]
    assert blip.marker.symbol != q2cap.marker.symbol

    names = [re.match(r"<b>([^<]+)</b>", t).group(1) for t in q2cap.text]
    assert sorted(names) == sorted(["baseline", "w4-vision", "w3-all", "lang-first-last", "mixed", "rtn-l3", "awq-l3"])
    expected_bits = {
        "baseline": (32, 32, 32),
        "w4-vision": (4, 32, 32),
        "w3-all": (3, 3, 3),
        "lang-first-last": (32, 32, 2),
        "mixed": (8, 4, 3),
        "rtn-l3": (32, 32, 3),
        "awq-l3": (32, 32, 3),
    }
    for i, name in enumerate(names):
        bits = expected_bits[name]
        value = 50.0 + Q2_VARIANTS.index(name)
        assert q2vqa.marker.color[i] == value
        assert tuple(q2vqa.customdata[i]) == (*bits, value)
        assert q2vqa.z[i] == bits[2]
        text = q2vqa.text[i]
        assert f"vision {bits[0]} · bridge {bits[1]} · language {bits[2]}" in text
        assert f"VQA accuracy (%): {value:.4g}" in text
        if name in ("rtn-l3", "awq-l3"):
            # Same three bit widths: spread apart around the common point, within the dodge radius.
            assert (q2vqa.x[i], q2vqa.y[i]) != (32.0, 32.0)
            assert abs(math.log10(q2vqa.x[i] / 32)) <= DODGE + 1e-9
            assert abs(math.log10(q2vqa.y[i] / 32)) <= DODGE + 1e-9
        else:
            assert (q2vqa.x[i], q2vqa.y[i]) == bits[:2]
    rtn, awq = names.index("rtn-l3"), names.index("awq-l3")
    assert (q2vqa.x[rtn], q2vqa.y[rtn]) != (q2vqa.x[awq], q2vqa.y[awq])
    assert "first" in q2vqa.text[names.index("lang-first-last")]
    assert q2vqa.text[names.index("w3-all")].endswith("change vs its baseline: +2")  # 52 - 50
    # One colour scale per task and dataset: shared limits and a single colour bar per group.
    assert (blip.marker.cmin, blip.marker.cmax) == (q2cap.marker.cmin, q2cap.marker.cmax) == (0.25, 7.0)
    assert (q2vqa.marker.cmin, q2vqa.marker.cmax) == (50.0, 56.0)
    assert [d.marker.showscale for d in fig.data] == [True, False, True]
    assert blip.marker.colorbar.title.text == "CIDEr"
    assert q2vqa.marker.colorbar.title.text == "VQA accuracy (%)"


def test_figure_axes_and_dropdown():
    fig = dropoff_3d_figure(_summary(), _variants())
    scene = fig.layout.scene
    assert scene.xaxis.title.text == "vision bits"
    assert scene.yaxis.title.text == "bridge (Q-Former) bits"
    assert scene.zaxis.title.text == "language bits"
    for axis in (scene.xaxis, scene.yaxis, scene.zaxis):
        assert axis.type == "log"
        assert list(axis.tickvals) == [2.0, 3.0, 4.0, 8.0, 32.0]
        assert axis.ticktext[-1] == "32 (fp32)"
        assert axis.range[0] < math.log10(2) and axis.range[1] > math.log10(32)
    tasks, colours = fig.layout.updatemenus
    assert [b.label for b in tasks.buttons] == ["captioning / shapes", "vqa / shapes"]
    assert [b.method for b in tasks.buttons] == ["update", "update"]
    assert tasks.buttons[0].args[0]["visible"] == [True, True, False]
    assert tasks.buttons[1].args[0]["visible"] == [False, False, True]
    assert "vqa on shapes" in tasks.buttons[1].args[1]["title.text"]
    assert "captioning on shapes" in fig.layout.title.text
    # The second menu recolours by the change against each trace's own baseline.
    by_value, by_change = (b.args[0] for b in colours.buttons)
    assert by_value["marker.color"][0] == [0.5, 0.25]
    assert by_change["marker.color"][0] == [0.0, -0.25]
    assert by_change["marker.colorbar.title.text"][2] == "VQA accuracy (%): change vs baseline"
    assert len(by_change["marker.color"]) == len(fig.data)


def test_html_page_is_self_contained(tmp_path):
    out = dropoff_3d(_summary(), _variants(), tmp_path / "figs" / "dropoff3d.html")
    assert out == tmp_path / "figs" / "dropoff3d.html"
    html = out.read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert len(re.findall(r"\* plotly\.js v\d", html)) == 1  # the library inline, once
    assert out.stat().st_size > 1_000_000
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, flags=re.IGNORECASE)
    assert "vqa on shapes" in html and "bridge (Q-Former) bits" in html
    assert sorted(p.name for p in out.parent.iterdir()) == ["dropoff3d.html"]  # no temporary file left


def test_nothing_to_draw():
    variants = _variants()
    kept = variants[variants["variant"].isin(["baseline", "w8a8", "prune-w4", "bf16"])]
    with pytest.raises(ValueError, match="no weight-quantized variants"):
        dropoff_3d_figure(_summary(), kept)
    with pytest.raises(ValueError, match="no weight-quantized variants"):
        dropoff_3d(_summary(), kept, "unused.html")
    empty = bits_by_part(_summary(), kept.iloc[0:0])
    assert empty.empty and "language_bits" in empty.columns
    # A quantized variant without any scored row draws nothing either.
    summary = _summary()
    with pytest.raises(ValueError, match="no weight-quantized variants"):
        dropoff_3d_figure(summary[summary["variant"] == "baseline"], variants)
    assert np.isfinite(bits_by_part(summary, variants)["value"]).all()
