"""The pruning table (pruned variants beside their baselines) and its bar figure."""

from __future__ import annotations

import math

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from vlmopt.plots.pruning import pruning_figure, pruning_plot, pruning_table
from vlmopt.plots.style import method_colour, plt

# (model, ft, variant): steps. "w4" quantizes only and must stay out of the table.
STEPS = {
    ("m-a", "ft", "baseline"): [],
    ("m-a", "ft", "q6"): [{"method": "prune_layers", "part": "bridge", "keep": 6}],
    ("m-a", "ft", "attn-heads"): [{"method": "prune_heads", "part": "language", "position": "all", "fraction": 0.5}],
    ("m-a", "ft", "drop-lora"): [
        {"method": "prune_layers", "part": "language", "drop_last": 1},
        {"method": "lora", "part": "language", "r": 8},
    ],
    ("m-a", "ft", "w4"): [{"method": "uniform", "part": "language", "bits": 4}],
    ("m-b", "ft", "baseline"): [],
    ("m-b", "ft", "drop2"): [{"method": "prune_layers", "part": "language", "drop_last": 2}],
    ("m-b", "ft", "w4"): [{"method": "uniform", "part": "language", "bits": 4}],
    ("m-b", "none", "baseline"): [],  # a baseline without pruning variants of its own: left out
}
# Total parameters; m-a / attn-heads has no efficiency rows at all.
PARAMS = {
    ("m-a", "ft", "baseline"): 200e6,
    ("m-a", "ft", "q6"): 180e6,
    ("m-a", "ft", "drop-lora"): 190e6,
    ("m-a", "ft", "w4"): 200e6,
    ("m-b", "ft", "baseline"): 400e6,
    ("m-b", "ft", "drop2"): 300e6,
    ("m-b", "ft", "w4"): 400e6,
    ("m-b", "none", "baseline"): 400e6,
}
CIDER = {"baseline": 2.0, "q6": 1.5, "attn-heads": 1.2, "drop-lora": 1.8, "w4": 1.9, "drop2": 0.9}


def _method(key: tuple[str, str, str]) -> str:
    return "+".join(s["method"] for s in STEPS[key]) or "none"


def _tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    variants, summary, efficiency = [], [], []
    for key, steps in STEPS.items():
        model, ft, variant = key
        base = {"model": model, "ft": ft, "variant": variant}
        if not steps:
            variants.append({**base, "step": -1, "method": "none"})
        variants += [{**base, "step": i, **s} for i, s in enumerate(steps)]
        tasks = [("captioning", "caps")] + ([("vqa", "qa")] if model == "m-a" else [])
        for task, dataset in tasks:
            row = {**base, "task": task, "dataset": dataset, "method": _method(key)}
            if task == "captioning":
                row |= {f"Bleu_{n}": 0.5 / n for n in range(1, 5)} | {"METEOR": 0.3, "ROUGE_L": 0.6}
                row["CIDEr"] = CIDER[variant] + (0.1 if model == "m-b" else 0.0)
            else:
                row["vqa_accuracy"] = 40 * CIDER[variant]
            summary.append(row | {"latency_ms_per_sample_p50": 10 * CIDER[variant], "gflops_per_sample": 3.0})
            where = {**base, "task": task, "dataset": dataset, "unit": "parameters"}
            # Profiling-sweep rows come first, so that a reader that forgot to skip them would pick them.
            efficiency.append({**where, "measure": "params", "value": 1.0, "sweep_axis": "batch_size"})
            if key in PARAMS:
                efficiency.append({**where, "measure": "params", "value": PARAMS[key], "sweep_axis": None})
            efficiency.append({**where, "measure": "gflops_per_sample", "value": 3.0, "sweep_axis": None})
    return pd.DataFrame(summary), pd.DataFrame(variants), pd.DataFrame(efficiency)


def test_rows_are_pruned_variants_after_their_baseline():
    table = pruning_table(*_tables())
    assert list(zip(table["task"], table["model"], table["ft"], table["variant"], strict=True)) == [
        ("captioning", "m-a", "ft", "baseline"),
        ("captioning", "m-a", "ft", "attn-heads"),  # sorts before "baseline" by name, comes after it
        ("captioning", "m-a", "ft", "drop-lora"),
        ("captioning", "m-a", "ft", "q6"),
        ("captioning", "m-b", "ft", "baseline"),
        ("captioning", "m-b", "ft", "drop2"),
        ("vqa", "m-a", "ft", "baseline"),
        ("vqa", "m-a", "ft", "attn-heads"),
        ("vqa", "m-a", "ft", "drop-lora"),
        ("vqa", "m-a", "ft", "q6"),
    ]
    assert list(table.columns) == [
        *["model", "ft", "variant", "task", "dataset", "method", "pruned"],
        *["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "vqa_accuracy"],
        *["params", "params_change", "latency_ms_per_sample_p50", "gflops_per_sample"],
    ]
    assert table["method"].tolist()[:4] == ["none", "prune_heads", "prune_layers+lora", "prune_layers"]
    assert table["CIDEr"].tolist()[:6] == pytest.approx([2.0, 1.2, 1.8, 1.5, 2.1, 1.0])
    assert table["vqa_accuracy"].tolist()[6:] == pytest.approx([80.0, 48.0, 72.0, 60.0])
    assert table["latency_ms_per_sample_p50"].tolist()[:2] == pytest.approx([20.0, 12.0])


def test_pruned_descriptions():
    table = pruning_table(*_tables())
    described = dict(zip(table["model"] + "/" + table["variant"], table["pruned"], strict=False))
    assert described == {
        "m-a/baseline": "unpruned",
        "m-a/q6": "bridge: 6 layers kept",
        "m-a/attn-heads": "language: 50% of heads removed",
        "m-a/drop-lora": "language: last 1 layer dropped + LoRA r=8",
        "m-b/baseline": "unpruned",
        "m-b/drop2": "language: last 2 layers dropped",
    }


def test_params_change_is_against_the_same_models_baseline():
    table = pruning_table(*_tables()).set_index(["task", "model", "variant"])
    caps = table.loc["captioning"]
    assert caps.loc[("m-a", "baseline"), "params"] == 200e6  # not the sweep row's 1.0
    assert caps.loc[("m-a", "baseline"), "params_change"] == pytest.approx(0.0)
    assert caps.loc[("m-a", "q6"), "params_change"] == pytest.approx(-10.0)
    assert caps.loc[("m-a", "drop-lora"), "params_change"] == pytest.approx(-5.0)
    assert caps.loc[("m-b", "drop2"), "params_change"] == pytest.approx(-25.0)  # m-a's baseline would give +50
    assert math.isnan(caps.loc[("m-a", "attn-heads"), "params"])  # no efficiency rows: NaN, not an error
    assert math.isnan(caps.loc[("m-a", "attn-heads"), "params_change"])

    summary, variants, _ = _tables()
    without = pruning_table(summary, variants, None)
    assert len(without) == 10 and without["params"].isna().all() and without["params_change"].isna().all()


def test_figure_bars_widths_and_colours():
    summary, variants, efficiency = _tables()
    fig = pruning_figure(summary, variants, efficiency)
    try:
        axes = np.array(fig.axes[:8]).reshape(2, 4)
        caps, vqa = axes
        assert caps[0].get_title(loc="left").startswith("captioning on caps")
        assert vqa[0].get_title(loc="left").startswith("vqa on qa")
        for ax in caps:
            assert len(ax.containers[0]) == 6
        for ax in vqa:
            assert len(ax.containers[0]) == 4
        widths = [[b.get_width() for b in ax.containers[0]] for ax in caps]
        assert widths[0] == pytest.approx([2.0, 1.2, 1.8, 1.5, 2.1, 1.0])  # CIDEr
        assert widths[1] == pytest.approx([200, 0, 190, 180, 400, 300])  # millions; the missing one drawn empty
        assert widths[2] == pytest.approx([20, 12, 18, 15, 20, 9])  # latency (ms)
        assert widths[3] == pytest.approx([3.0] * 6)  # GFLOP
        assert caps[1].get_xlabel() == "parameters (millions)"
        assert caps[3].get_xlabel() == "GFLOP per sample"
        assert [t.get_text() for t in caps[1].texts] == [
            "200",
            "n/a",
            "190 (-5.0%)",
            "180 (-10.0%)",
            "400",
            "300 (-25.0%)",
        ]
        methods = ["none", "prune_heads", "prune_layers+lora", "prune_layers", "none", "prune_layers"]
        for ax in caps:
            assert [to_hex(b.get_facecolor()) for b in ax.containers[0]] == [to_hex(method_colour(m)) for m in methods]
        labels = [t.get_text() for t in caps[0].get_yticklabels()]
        assert labels[0] == "m-a / ft / baseline\nunpruned"
        assert labels[3] == "m-a / ft / q6\nbridge: 6 layers kept"
        legend = fig.legends[0]
        assert [t.get_text() for t in legend.get_texts()] == [
            "none (baseline)",
            "prune_heads",
            "prune_layers+lora",
            "prune_layers",
        ]
    finally:
        plt.close(fig)


def test_tiny_models_read_in_thousands_and_mflop():
    summary, variants, efficiency = _tables()
    efficiency = efficiency.assign(value=efficiency["value"] / 1000)
    summary = summary.assign(gflops_per_sample=0.012)
    fig = pruning_figure(summary, variants, efficiency)
    try:
        ax_params, ax_flop = fig.axes[1], fig.axes[3]
        assert ax_params.get_xlabel() == "parameters (thousands)"
        assert [b.get_width() for b in ax_params.containers[0]] == pytest.approx([200, 0, 190, 180, 400, 300])
        assert ax_flop.get_xlabel() == "MFLOP per sample"
        assert [b.get_width() for b in ax_flop.containers[0]] == pytest.approx([12.0] * 6)
    finally:
        plt.close(fig)


def test_plot_writes_png_and_refuses_without_pruning(tmp_path):
    summary, variants, efficiency = _tables()
    out = pruning_plot(summary, variants, efficiency, tmp_path / "fig" / "pruning.png")
    assert out == tmp_path / "fig" / "pruning.png"
    image = mpimg.imread(out)
    assert image.shape[0] > 400 and image.shape[1] > 1000

    quantized_only = variants[~variants["method"].isin(["prune_layers", "prune_heads", "lora"])]
    assert pruning_table(summary, quantized_only, efficiency).empty
    with pytest.raises(ValueError, match="no pruning variants"):
        pruning_plot(summary, quantized_only, efficiency, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
