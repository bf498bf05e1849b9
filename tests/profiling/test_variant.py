"""Efficiency rows of a variant (vlmopt.profiling.variant) and the profile stage's table.

Timings are not compared with thresholds; what must hold whatever the machine's speed is checked:
every measure present with its unit and method, FLOPs that do not depend on the batch size per
sample, a missing energy counter reported as missing, the simulated flag carried to the rows.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from vlmopt.data.images import open_image
from vlmopt.models import load_model
from vlmopt.pipeline import compress_loaded, profile_variant
from vlmopt.profiling import generation_flops
from vlmopt.profiling.variant import profile_variant as measure
from vlmopt.tables import EFFICIENCY_SCHEMA, summarise
from vlmopt.tasks import get_task

QUICK = {"warmup": 1, "repeats": 3, "energy_idle_s": 0.0}
GENERATION = {"max_new_tokens": 4, "num_beams": 1}
GENERATIVE_MEASURES = {
    "latency_ms_p50",
    "latency_ms_p95",
    "latency_ms_per_sample_p50",
    "latency_ms_per_sample_p95",
    "latency_spread",
    "throughput_samples_per_s",
    "throughput_tokens_per_s",
    "prefill_ms_p50",
    "decode_ms_per_token_p50",
    "vision_ms_p50",
    "peak_mem_mb",
    "peak_mem_delta_mb",
    "energy_j_per_sample",
    "energy_gross_j_per_sample",
    "idle_power_w",
    "decode_weight_bytes_per_step",
    "decode_bandwidth_gb_s",
    "decode_bandwidth_fraction",
    "prefill_tflops",
    "prefill_compute_fraction",
    "gflops_per_sample",
    "gflops_prefill_per_sample",
    "gflops_per_token_per_sample",
    "first_call_ms",
    "input_image_px_per_sample",
    "prompt_tokens_per_sample",
    "input_tokens_per_sample",
    "pixel_values_per_sample",
}


@pytest.fixture(scope="module")
def blip(shapes_texts):
    torch.manual_seed(0)
    return load_model("tiny:blip", texts=shapes_texts, seed=0)


def _values(df: pd.DataFrame) -> dict[str, float | None]:
    return {m: (None if pd.isna(v) else float(v)) for m, v in zip(df["measure"], df["value"], strict=True)}


def test_generation_rows(blip, shapes_test, shapes_root):
    df = measure(
        blip, shapes_test, shapes_root, "captioning", settings={**QUICK, "batch_size": 2}, generation=GENERATION
    )
    assert set(df["measure"]) == GENERATIVE_MEASURES
    assert df["unit"].notna().all() and df["method"].str.len().gt(0).all()
    assert set(df["batch_size"]) == {2} and set(df["device"]) == {"cpu"} and not df["simulated"].any()
    v = _values(df)
    for name in ("latency_ms_p50", "prefill_ms_p50", "vision_ms_p50", "peak_mem_mb", "gflops_per_token_per_sample"):
        assert v[name] is not None and v[name] > 0, name
    assert v["latency_ms_p95"] >= v["latency_ms_p50"]
    assert v["latency_ms_per_sample_p50"] == pytest.approx(v["latency_ms_p50"] / 2)
    assert v["first_call_ms"] > 0
    # The inputs as the model got them: 64 x 64 shapes images, BLIP's 3 x 64 x 64 pixel values, an
    # empty captioning prompt ([BOS] and the trailing [SEP] only).
    assert v["input_image_px_per_sample"] == 64 * 64 and v["pixel_values_per_sample"] == 3 * 64 * 64
    assert v["prompt_tokens_per_sample"] == 0 and v["input_tokens_per_sample"] == 2
    assert v["throughput_tokens_per_s"] == pytest.approx(v["throughput_samples_per_s"] * 4)
    # The batch generates exactly max_new_tokens: total = prefill + 3 decoding steps, per sample.
    assert v["gflops_per_sample"] == pytest.approx(
        v["gflops_prefill_per_sample"] + 3 * v["gflops_per_token_per_sample"]
    )
    # Independently: the FLOP counter around model.generate on the same two encoded samples.
    rows = shapes_test.head(2)
    images = [open_image(shapes_root, rel) for rel in rows["image"]]
    encoded = blip.adapter.encode(blip, images, get_task("captioning").prompts(rows, blip.adapter))
    reference = generation_flops(blip.model, encoded.inputs, new_tokens=3)
    assert v["gflops_prefill_per_sample"] == pytest.approx(reference.prefill_flops / 2 / 1e9, rel=1e-9)
    assert v["gflops_per_token_per_sample"] == pytest.approx(reference.flops_per_token / 2 / 1e9, rel=1e-9)
    energy = df.set_index("measure").loc["energy_j_per_sample"]
    # No energy counter on this kind of machine: missing, with the reason; where there is one, a number.
    assert (pd.isna(energy["value"]) and "RAPL" in energy["note"]) or math.isfinite(energy["value"])


def test_flops_per_sample_do_not_depend_on_the_batch(blip, shapes_test, shapes_root):
    """The shapes prompts have one length, so a sample costs the same FLOPs alone or in a batch of 3."""
    fast = {"warmup": 0, "repeats": 1, "energy_idle_s": 0.0}
    one = _values(
        measure(blip, shapes_test, shapes_root, "captioning", settings={**fast, "batch_size": 1}, generation=GENERATION)
    )
    three = _values(
        measure(blip, shapes_test, shapes_root, "captioning", settings={**fast, "batch_size": 3}, generation=GENERATION)
    )
    for name in ("gflops_per_sample", "gflops_prefill_per_sample", "gflops_per_token_per_sample"):
        assert three[name] == pytest.approx(one[name], rel=1e-9), name
    # More new tokens cost more FLOPs per sample (decoding is counted, not only the prefill).
    longer = _values(
        measure(
            blip,
            shapes_test,
            shapes_root,
            "captioning",
            settings={**fast, "batch_size": 1},
            generation={"max_new_tokens": 8},
        )
    )
    assert longer["gflops_per_sample"] > one["gflops_per_sample"]
    assert longer["gflops_prefill_per_sample"] == pytest.approx(one["gflops_prefill_per_sample"], rel=1e-9)


def test_similarity_rows(shapes_texts, shapes_test, shapes_root):
    clip = load_model("tiny:clip", texts=shapes_texts, seed=0)
    df = measure(clip, shapes_test, shapes_root, "classification", settings={**QUICK, "batch_size": 4})
    v = _values(df)
    assert "prefill_ms_p50" not in v and "throughput_tokens_per_s" not in v and "prompt_tokens_per_sample" not in v
    assert v["gflops_per_sample"] > 0 and v["latency_ms_p50"] > 0
    assert "adapter.embed_images" in df.set_index("measure").loc["latency_ms_p50", "method"]


def test_simulated_variants_say_their_latency_is_the_dense_models(blip, shapes_test, shapes_root):
    manifest = {"simulated": True, "parameters": {"model": {"total": 10}, "vision": {"total": 4}}}
    df = measure(blip, shapes_test, shapes_root, "vqa", settings=QUICK, generation=GENERATION, manifest=manifest)
    notes = df.set_index("measure")["note"]
    assert df["simulated"].all()
    assert "latency and memory are the dense model's" in notes["latency_ms_p50"]
    assert "dense model" in notes["peak_mem_mb"]
    assert pd.isna(notes["gflops_per_sample"]) or "dense" not in notes["gflops_per_sample"]
    assert _values(df)["params"] == 10 and _values(df)["params_vision"] == 4


def test_bad_settings_are_named(blip, shapes_test, shapes_root):
    with pytest.raises(ValueError, match="profiling.batch_size must be at least 1"):
        measure(blip, shapes_test, shapes_root, "captioning", settings={"batch_size": 0})
    with pytest.raises(ValueError, match="cannot run task 'retrieval'"):
        measure(blip, shapes_test, shapes_root, "retrieval")
    with pytest.raises(ValueError, match="needs 100 readable images; the split has 24"):
        measure(blip, shapes_test, shapes_root, "captioning", settings={**QUICK, "batch_size": 100})


def test_profile_stage_writes_the_efficiency_table_and_the_summary_joins_it(blip, shapes_root, tmp_path):
    folder = tmp_path / "blip-tiny" / "none" / "int8"
    compress_loaded(blip, folder, steps=[{"method": "dynamic_int8", "part": "language", "backend": "fbgemm"}])
    table, root = shapes_root / "test.parquet", shapes_root
    tasks = {
        "captioning": {"table": table, "root": root, "dataset": "shapes", "generation": GENERATION},
        "vqa": {"table": table, "root": root, "dataset": "shapes", "generation": {"max_new_tokens": 2}},
    }
    keys = {"model": "blip-tiny", "ft": "none", "variant": "int8"}
    out = tmp_path / "profile.parquet"
    profile_variant(folder, tasks, out, keys=keys, settings=QUICK)
    efficiency = pd.read_parquet(out)
    assert list(efficiency.columns) == EFFICIENCY_SCHEMA.names
    assert set(efficiency["task"]) == {"captioning", "vqa"} and set(efficiency["dataset"]) == {"shapes"}
    assert (efficiency[list(keys)] == pd.Series(keys)).all().all()
    assert efficiency["torch_version"].notna().all()
    captioning = efficiency[efficiency["task"] == "captioning"]
    v = _values(captioning)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert v["size_bytes"] == manifest["serialized_size_bytes"]
    assert v["compression_ratio"] == pytest.approx(manifest["nominal_compression_ratio"])
    # The int8 Linear layers are invisible to the FLOP counter: the count says it is a lower bound.
    assert "lower bound" in captioning.set_index("measure").loc["gflops_per_sample", "note"]

    scores = pd.DataFrame(
        [
            {**keys, "task": t, "dataset": "shapes", "metric": m, "value": 1.5}
            for t, m in (("captioning", "CIDEr"), ("vqa", "vqa_accuracy"))
        ]
    )
    summary = summarise(scores, efficiency=efficiency).set_index("task")
    assert summary.loc["captioning", "latency_ms_p50"] == v["latency_ms_p50"]
    assert (
        summary.loc["vqa", "gflops_per_sample"] == _values(efficiency[efficiency["task"] == "vqa"])["gflops_per_sample"]
    )


def test_blip2_with_trainable_parameters_is_profiled_and_left_trainable(shapes_texts, shapes_test, shapes_root):
    """The FLOP counter's module tracker fails on parameters that require gradients; profiling freezes them."""
    blip2 = load_model("tiny:blip2-opt", texts=shapes_texts, seed=0)
    blip2.model.requires_grad_(True)
    fast = {"warmup": 0, "repeats": 1, "energy_idle_s": 0.0}
    v = _values(measure(blip2, shapes_test, shapes_root, "captioning", settings=fast, generation={"max_new_tokens": 3}))
    assert v["gflops_per_token_per_sample"] > 0 and v["gflops_prefill_per_sample"] > 0
    assert all(p.requires_grad for p in blip2.model.parameters())


def test_the_batch_skips_unreadable_images_and_reads_no_further_than_it_needs(
    blip, shapes_test, shapes_root, tmp_path, monkeypatch, caplog
):
    import vlmopt.streaming
    from vlmopt.profiling.variant import _batch

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "images" / "test").symlink_to(shapes_root / "images" / "test", target_is_directory=True)
    table = shapes_test.copy()
    table.loc[[1, 2], "image"] = "images/test/missing.png"  # the second and third rows' images are gone
    opened = []
    real_open = vlmopt.streaming.open_image

    def counting(root, rel):
        opened.append(rel)
        return real_open(root, rel)

    monkeypatch.setattr(vlmopt.streaming, "open_image", counting)
    rows, images = _batch(blip, table, root, "captioning", 4)
    assert rows["sample_id"].tolist() == table["sample_id"].iloc[[0, 3, 4, 5]].tolist()
    assert [im.tobytes() for im in images] == [
        open_image(shapes_root, rel).tobytes() for rel in table["image"].iloc[[0, 3, 4, 5]]
    ]
    assert len(opened) == 7  # two batches of 4 (the missing path once per batch), not the split's 24
    assert caplog.text.count("profiling skips") == 2


class _FakeMeter:
    """An EnergyMeter stand-in whose counter reads: 4 J a second of region, idle 1 W."""

    def __init__(self, device, idle_s):
        self.measuring = False

    def __enter__(self):
        import time

        self.measuring, self.start = True, time.perf_counter()
        return self

    def __exit__(self, *exc):
        import time

        from vlmopt.profiling.energy import EnergyResult

        seconds = time.perf_counter() - self.start
        self.measuring = False
        self.result = EnergyResult(4.0 * seconds - seconds, 4.0 * seconds, 1.0, seconds, "fake counter", "cpu")


def test_a_read_counter_gets_at_least_energy_min_s_of_work_and_three_energy_rows(
    blip, shapes_test, shapes_root, monkeypatch
):
    monkeypatch.setattr("vlmopt.profiling.variant.EnergyMeter", _FakeMeter)
    settings = {"warmup": 0, "repeats": 1, "energy_idle_s": 0.0, "energy_min_s": 1.0}
    df = measure(blip, shapes_test, shapes_root, "captioning", settings=settings, generation=GENERATION)
    rows = df.set_index("measure")
    calls = int(rows.loc["energy_j_per_sample", "method"].split("; ")[1].split(" calls")[0])
    seconds = float(rows.loc["energy_j_per_sample", "method"].split(" over ")[1].split(" s")[0])
    # A second of work at least: one call of the tiny model takes well under it, so more calls than
    # repeats (unless the machine is so loaded that the first call alone lasts a second).
    method = rows.loc["energy_j_per_sample", "method"]
    assert seconds >= 1.0 and (calls > 1) == ("more than repeats, to last 1 s" in method)
    # Net = gross - idle x time, per sample (batch 1).
    assert rows.loc["energy_gross_j_per_sample", "value"] == pytest.approx(4.0 * seconds / calls, rel=0.01)
    assert rows.loc["energy_j_per_sample", "value"] == pytest.approx(3.0 * seconds / calls, rel=0.01)
    assert rows.loc["idle_power_w", "value"] == 1.0
