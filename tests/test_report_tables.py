"""Tables and figures of the report on small synthetic tables: the variants table, the best
variant under a budget, the bit-width drop-off figure."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmopt.plots.budget import best_under_budget
from vlmopt.plots.dropoff import bit_width_lines, bits_figure, quality_vs_bits
from vlmopt.plots.style import method_colour
from vlmopt.report import variant_table
from vlmopt.tables import STEPS_SCHEMA, score_rows, summarise, variant_method, variant_steps, write_parquet

KEYS = {"model": "m", "ft": "none", "variant": "v"}


def _step(method, **settings):
    return {"method": method, "settings": {"method": method, **settings}, "simulated": False, "n_modules": 3}


def test_variant_steps_flatten_the_manifest():
    assert variant_steps(KEYS, {"steps": [], "methods": []}) == [
        {**KEYS, "step": -1, "method": "none", "simulated": False, "n_modules": 0, "n_layers": 0}
    ]
    manifest = {
        "methods": ["prune_layers", "lora"],
        "steps": [
            _step("prune_layers", part="language", position=["first", "last"], drop_last=1, modules=[]),
            _step("uniform", part="vision", bits=4, group_size=None, layers={"a": 1}),
        ],
    }
    # The pruned layer's modules lie in one layer; the quantized ones in two layers of one part
    # and one of another (same index, other part), and a module without a layer index counts none.
    manifest["steps"][0]["modules"] = [{"part": "language", "layer_index": 2}] * 3
    manifest["steps"][1]["modules"] = [
        {"part": "vision", "layer_index": 0},
        {"part": "vision", "layer_index": 1},
        {"part": "language", "layer_index": 1},
        {"part": "vision", "layer_index": None},
    ]
    rows = variant_steps(KEYS, manifest)
    assert [r["step"] for r in rows] == [0, 1] and [r["method"] for r in rows] == ["prune_layers", "uniform"]
    assert rows[0]["position"] == "first+last" and rows[0]["drop_last"] == 1 and rows[0]["bits"] is None
    assert rows[1]["bits"] == 4 and rows[1]["part"] == "vision" and "layers" not in rows[1]
    assert [r["n_layers"] for r in rows] == [1, 3]
    table = pa.Table.from_pylist(rows, schema=STEPS_SCHEMA)
    assert table.num_rows == 2
    assert variant_method(manifest) == "prune_layers+lora" and variant_method({"methods": []}) == "none"


def _summary(rows):
    base = {"ft": "none", "task": "captioning", "dataset": "d"}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_best_under_budget_picks_the_best_quality_within_the_limit():
    summary = _summary(
        [
            {"model": "a", "variant": "baseline", "CIDEr": 50.0, "size_bytes": 400.0},
            {"model": "a", "variant": "w4", "CIDEr": 45.0, "size_bytes": 100.0},
            {"model": "a", "variant": "w8", "CIDEr": 49.0, "size_bytes": 200.0},
            {"model": "b", "variant": "w8", "CIDEr": 49.0, "size_bytes": 150.0},
            {"model": "b", "variant": "unknown", "CIDEr": 99.0, "size_bytes": None},
        ]
    )
    best = best_under_budget(summary, "size_bytes", 250).iloc[0]
    # w8 of model b ties with w8 of model a on quality and costs less; the unknown cost never counts.
    assert (best["model"], best["variant"], best["value"], best["cost_value"]) == ("b", "w8", 49.0, 150.0)
    assert best["n_within"] == 3 and best["n_total"] == 5
    assert best_under_budget(summary, "size_bytes", 1000).iloc[0]["variant"] == "baseline"
    none = best_under_budget(summary, "size_bytes", 50).iloc[0]
    assert none["n_within"] == 0 and none["variant"] is None
    with pytest.raises(ValueError, match="unknown budget cost 'weight'"):
        best_under_budget(summary, "weight", 1)
    with pytest.raises(ValueError, match="no 'energy_j_per_sample' column"):
        best_under_budget(summary, "energy_j_per_sample", 1)


def _grid():
    rows, steps = [], []
    for model in ("a", "b"):
        rows.append({"model": model, "variant": "baseline", "CIDEr": 60.0})
        steps.append({"model": model, "ft": "none", "variant": "baseline", "step": -1, "method": "none"})
        for part in ("vision", "language"):
            for bits in (2, 4, 8):
                name = f"{part}-{bits}"
                rows.append({"model": model, "variant": name, "CIDEr": 10.0 * bits})
                steps.append(
                    {
                        "model": model,
                        "ft": "none",
                        "variant": name,
                        "step": 0,
                        "method": "uniform",
                        "part": part,
                        "position": "all",
                        "bits": bits,
                    }
                )
    # Two steps (prune, then quantize) and a weight-and-activation variant: not on the lines.
    rows += [{"model": "a", "variant": "prune-w4", "CIDEr": 1.0}, {"model": "a", "variant": "w8a8", "CIDEr": 2.0}]
    steps += [
        {"model": "a", "ft": "none", "variant": "prune-w4", "step": 0, "method": "prune_layers"},
        {"model": "a", "ft": "none", "variant": "prune-w4", "step": 1, "method": "uniform", "bits": 4},
        {
            "model": "a",
            "ft": "none",
            "variant": "w8a8",
            "step": 0,
            "method": "uniform",
            "bits": 8,
            "activation_bits": 8,
        },
    ]
    return _summary(rows), pd.DataFrame(steps)


def test_bit_width_lines_and_figure(tmp_path):
    summary, variants = _grid()
    lines = bit_width_lines(summary, variants)
    # 2 models x 2 parts x 3 widths, and the w8a8 variant; the two-step variant is left out.
    assert len(lines) == 13 and "prune-w4" not in set(lines["variant"])
    fig = bits_figure(summary, variants)
    ax = fig.axes[0]
    drawn = [line for line in ax.lines if not line.get_label().startswith("_")]
    # One line per (model, ft, quantizer, part, position), three points each; w8a8 is not among them.
    assert sorted(line.get_label() for line in drawn) == [
        "a/none/uniform/language/all",
        "a/none/uniform/vision/all",
        "b/none/uniform/language/all",
        "b/none/uniform/vision/all",
    ]
    assert all(list(line.get_xdata()) == [2, 4, 8] for line in drawn)
    assert all(list(line.get_ydata()) == [20.0, 40.0, 80.0] for line in drawn)
    # Coloured by the quantizer (uniform's colour in every figure), styled by part: the two parts
    # differ, the two models of one part do not.
    assert {line.get_color() for line in drawn} == {method_colour("uniform")}
    style = {line.get_label(): line.get_linestyle() for line in drawn}
    assert style["a/none/uniform/language/all"] == style["b/none/uniform/language/all"]
    assert style["a/none/uniform/language/all"] != style["a/none/uniform/vision/all"]
    # Each model's baseline is a dashed horizontal line.
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(dashed) == 2 and all(list(line.get_ydata()) == [60.0, 60.0] for line in dashed)
    assert quality_vs_bits(summary, variants, tmp_path / "bits.png").stat().st_size > 5000
    with pytest.raises(ValueError, match="no single-step weight-quantization variant"):
        bits_figure(summary, variants[variants["method"] != "uniform"])
    # Steps recorded without a part or position (older tables) select all of it: still one line each.
    lines = bit_width_lines(summary, variants.drop(columns=["position"]))
    assert set(lines["position"]) == {"all"} and len(lines) == 13


def test_confusion_matrices_show_counts_and_shares(tmp_path):
    from vlmopt.plots.confusion import confusion_figure, confusion_matrices

    counts = {"real_as_real": 8, "real_as_generated": 1, "real_as_unparsed": 1, "generated_as_generated": 5}
    rows = [
        {"model": "m", "ft": "realgen", "variant": v, "task": "real_vs_generated", "dataset": "d", "accuracy": a}
        | {f"cm_{k}": n for k, n in counts.items()}
        for v, a in (("baseline", 72.2), ("int8", 70.0))
    ]
    rows.append({"model": "m", "ft": "none", "variant": "baseline", "task": "captioning", "dataset": "d"})
    fig = confusion_figure(pd.DataFrame(rows))
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == [
        "m / realgen / baseline\naccuracy 72.2 %",
        "m / realgen / int8\naccuracy 70.0 %",
    ]
    # Colour: each true class's shares (a missing count is 0); text: counts and shares.
    shares = shown[0].images[0].get_array()
    assert shares.tolist() == [[0.8, 0.1, 0.1], [0.0, 1.0, 0.0]]
    texts = {t.get_text() for t in shown[0].texts}
    assert {"8\n80%", "1\n10%", "5\n100%", "0\n0%"} <= texts
    assert confusion_matrices(pd.DataFrame(rows), tmp_path / "cm.png").stat().st_size > 5000
    with pytest.raises(ValueError, match="no real_vs_generated configuration"):
        confusion_figure(pd.DataFrame(rows[-1:]))


def test_summary_and_configuration_table_carry_sample_counts(tmp_path):
    """n_samples and n_failed of each evaluation reach the summary and the report's configuration table."""
    frames = []
    for variant in ("baseline", "w4"):
        for task, metrics in (("captioning", {"CIDEr": 1.0, "BLEU-4": 0.5}), ("vqa", {"vqa_accuracy": 40.0})):
            keys = {"model": "m", "ft": "none", "variant": variant, "task": task, "dataset": "d"}
            failed = 3 if (variant, task) == ("w4", "captioning") else 0
            frames.append(score_rows(keys, metrics, n_samples=50, n_failed=failed, settings={}).to_pandas())
    summary = summarise(pd.concat(frames, ignore_index=True))
    assert len(summary) == 4
    by_key = summary.set_index(["variant", "task"])
    assert by_key.loc[("w4", "captioning"), "n_failed"] == 3
    assert by_key.drop(index=[("w4", "captioning")])["n_failed"].tolist() == [0, 0, 0]
    assert (summary["n_samples"] == 50).all()
    # Written and read back, the counts stay integers.
    write_parquet(pa.Table.from_pandas(summary, preserve_index=False), tmp_path / "summary.parquet")
    schema = pq.read_schema(tmp_path / "summary.parquet")
    assert schema.field("n_failed").type == pa.int64() and schema.field("n_samples").type == pa.int64()
    table = variant_table(pd.read_parquet(tmp_path / "summary.parquet"))
    assert list(table.columns) == [
        *("model", "ft", "variant", "task", "dataset", "metric", "value"),
        *("n_samples", "n_failed"),
    ]
    row = table[(table["variant"] == "w4") & (table["task"] == "captioning")].iloc[0]
    assert (row["metric"], row["value"], row["n_samples"], row["n_failed"]) == ("CIDEr", 1.0, 50, 3)
    assert table["n_failed"].sum() == 3


def test_summary_without_counts_in_the_scores_has_empty_count_columns():
    scores = pd.DataFrame([{**KEYS, "task": "captioning", "dataset": "d", "metric": "CIDEr", "value": 1.0}])
    summary = summarise(scores)
    assert summary["n_samples"].isna().all() and summary["n_failed"].isna().all()
