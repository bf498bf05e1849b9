"""Profiling sweeps (vlmopt.profiling.sweep): each axis changes what it says and nothing else.

Timings are not compared; what each point must change is: the images' size and the tensor the
processor makes of them, the prompt's token count and the FLOPs that follow from it, the batch,
the weights' dtype, the attention kernels (or a reason why not), compiled graphs.
"""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest
import torch
from PIL import Image

from vlmopt.models import load_model
from vlmopt.models.encoding import text_ids
from vlmopt.pipeline import compress_loaded, profile_variant
from vlmopt.plots.scaling import scaling_curves, sweep_table
from vlmopt.profiling.sweep import SweepPoint, apply_point, lengthen_prompts, resize_longest, sweep_points
from vlmopt.profiling.variant import profile_variant as measure
from vlmopt.tables import EFFICIENCY_SCHEMA, summarise

QUICK = {"warmup": 0, "repeats": 2, "energy_idle_s": 0.0}
GENERATION = {"max_new_tokens": 3, "num_beams": 1}


def _values(df: pd.DataFrame) -> dict[str, float | None]:
    return {m: (None if pd.isna(v) else float(v)) for m, v in zip(df["measure"], df["value"], strict=True)}


@pytest.fixture(scope="module")
def blip(shapes_texts):
    return load_model("tiny:blip", texts=shapes_texts, seed=0)


@pytest.fixture(scope="module")
def blip2(shapes_texts):
    return load_model("tiny:blip2-opt", texts=shapes_texts, seed=0)


def test_points_slugs_and_bad_values():
    points = sweep_points({"batch_size": [1, 8], "dtype": ["bfloat16"], "compile": [True, False]})
    assert [p.slug for p in points] == [
        "batch_size-1",
        "batch_size-8",
        "dtype-bfloat16",
        "compile-true",
        "compile-false",
    ]
    assert [p.text for p in points][-2:] == ["true", "false"]
    with pytest.raises(ValueError, match="unknown profiling sweep axis 'resolution'"):
        sweep_points({"resolution": [224]})
    with pytest.raises(ValueError, match=r"profiling.sweep.batch_size: True is not a positive integer"):
        SweepPoint("batch_size", True)
    with pytest.raises(ValueError, match=r"profiling.sweep.image_size: 0 is not a positive integer"):
        SweepPoint("image_size", 0)
    with pytest.raises(ValueError, match=r"dtype: 'float8' is not one of \['float32', 'float16', 'bfloat16'\]"):
        SweepPoint("dtype", "float8")
    with pytest.raises(ValueError, match=r"compile: 1 is not one of \[False, True\]"):
        SweepPoint("compile", 1)
    with pytest.raises(ValueError, match="repeats a value"):
        sweep_points({"prompt_length": [8, 8]})
    with pytest.raises(ValueError, match="expected a non-empty list"):
        sweep_points({"prompt_length": 8})


def test_resize_keeps_the_aspect_ratio():
    wide, square = Image.new("RGB", (200, 100)), Image.new("RGB", (64, 64))
    assert [im.size for im in resize_longest([wide, square], 50)] == [(50, 25), (50, 50)]
    assert [im.size for im in resize_longest([wide, square], 400)] == [(400, 200), (400, 400)]


def test_prompts_are_lengthened_to_the_token_count(blip):
    tok = blip.tokenizer
    prompts = ["a picture of", "", "what color is the circle ? " * 6]
    out, counts = lengthen_prompts(tok, prompts, 12)
    assert counts == [len(text_ids(tok, p)) for p in out]
    assert counts[0] == 12 and counts[1] == 12
    assert out[0].endswith("a picture of") and out[2] == prompts[2] and counts[2] > 12


def test_image_size_changes_the_input_but_not_a_fixed_size_processor(blip, shapes_test, shapes_root):
    small, large = (
        measure(blip, shapes_test, shapes_root, "captioning", settings=QUICK, generation=GENERATION, image_size=s)
        for s in (16, 128)
    )
    small, large = _values(small), _values(large)
    assert small["input_image_px_per_sample"] == 16 * 16 and large["input_image_px_per_sample"] == 128 * 128
    # BLIP's processor resizes every image to its input size: the model sees the same tensor and work.
    assert small["pixel_values_per_sample"] == large["pixel_values_per_sample"] == 3 * 64 * 64
    assert small["gflops_per_sample"] == pytest.approx(large["gflops_per_sample"], rel=1e-12)


def test_image_size_scales_the_work_of_a_dynamic_resolution_family(shapes_test, shapes_root):
    qwen = load_model("tiny:qwen2_5_vl", seed=0)
    rows = {
        s: _values(
            measure(qwen, shapes_test, shapes_root, "captioning", settings=QUICK, generation=GENERATION, image_size=s)
        )
        for s in (32, 64)
    }
    # Qwen2.5-VL keeps the image's size (within the tiny processor's budget of 32 x 32 to 64 x 64
    # pixels): twice the side, four times the patches, 16 image tokens instead of 4.
    assert rows[64]["pixel_values_per_sample"] == 4 * rows[32]["pixel_values_per_sample"]
    assert rows[64]["input_tokens_per_sample"] - rows[32]["input_tokens_per_sample"] == 16 - 4
    assert rows[64]["gflops_prefill_per_sample"] > 3 * rows[32]["gflops_prefill_per_sample"] / 2


def test_prompt_length_scales_the_prefill(blip, shapes_test, shapes_root):
    rows = {
        n: _values(
            measure(blip, shapes_test, shapes_root, "vqa", settings=QUICK, generation=GENERATION, prompt_length=n)
        )
        for n in (16, 40)
    }
    assert rows[16]["prompt_tokens_per_sample"] == 16 and rows[40]["prompt_tokens_per_sample"] == 40
    # BLIP's text input is [BOS] + the prompt + [SEP].
    assert rows[40]["input_tokens_per_sample"] == 42
    assert rows[40]["gflops_prefill_per_sample"] > rows[16]["gflops_prefill_per_sample"]
    # Each new token attends to the longer prompt too.
    assert rows[40]["gflops_per_token_per_sample"] > rows[16]["gflops_per_token_per_sample"]
    # Image embedding does not read the prompt: not measured, and the rows say why.
    clip = load_model("tiny:clip", seed=0)
    skipped = measure(clip, shapes_test, shapes_root, "retrieval", settings=QUICK, prompt_length=8)
    assert skipped["value"].isna().all()
    assert skipped["note"].str.contains("embeds images only").all()


@pytest.fixture(scope="module")
def variants(blip2, blip, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    compress_loaded(blip2, root / "blip2" / "none" / "baseline", steps=[])
    compress_loaded(blip, root / "blip" / "none" / "baseline", steps=[])
    steps = [{"method": "dynamic_int8", "part": "language", "backend": "fbgemm"}]
    compress_loaded(blip, root / "blip" / "none" / "int8", steps=steps)
    return root


def _point(folder, shapes_root, tmp_path, axis, value, settings=QUICK):
    table = shapes_root / "test.parquet"
    tasks = {"captioning": {"table": table, "root": shapes_root, "dataset": "shapes", "generation": GENERATION}}
    keys = dict(zip(("model", "ft", "variant"), folder.parts[-3:], strict=True))
    out = tmp_path / f"{axis}-{value}.parquet"
    return profile_variant(folder, tasks, out, keys=keys, settings=settings, point={"axis": axis, "value": value})


def test_a_point_carries_its_axis_and_no_size_rows(variants, shapes_root, tmp_path):
    df = _point(variants / "blip2" / "none" / "baseline", shapes_root, tmp_path, "batch_size", 3)
    assert list(df.columns) == EFFICIENCY_SCHEMA.names
    assert set(df["sweep_axis"]) == {"batch_size"} and set(df["sweep_value"]) == {"3"}
    assert set(df["batch_size"]) == {3}
    assert not {"size_bytes", "params", "compression_ratio"} & set(df["measure"])
    assert df.set_index("measure").loc["latency_ms_p50", "method"].startswith("batch size 3; ")
    # The summary joins the variant's own profile only, never a sweep point.
    base = profile_variant(
        variants / "blip2" / "none" / "baseline",
        {"captioning": {"table": shapes_root / "test.parquet", "root": shapes_root, "dataset": "shapes"}},
        tmp_path / "base.parquet",
        keys={"model": "blip2", "ft": "none", "variant": "baseline"},
        settings=QUICK,
    )
    assert base["sweep_axis"].isna().all()
    scores = pd.DataFrame(
        [{"model": "blip2", "ft": "none", "variant": "baseline", "task": "captioning", "dataset": "shapes"}]
    ).assign(metric="CIDEr", value=1.0)
    summary = summarise(scores, efficiency=pd.concat([df, base]))
    assert summary["latency_ms_p50"].iloc[0] == _values(base)["latency_ms_p50"]


def test_dtype_point_casts_the_model_or_says_why_not(variants, shapes_root, tmp_path):
    df = _point(variants / "blip2" / "none" / "baseline", shapes_root, tmp_path, "dtype", "bfloat16")
    v = _values(df)
    assert v["latency_ms_p50"] > 0 and v["gflops_per_sample"] > 0
    assert df.set_index("measure").loc["latency_ms_p50", "method"].startswith("model cast to bfloat16")
    # int8 kernels take float32 inputs: a bfloat16 cast does not apply, and is not measured.
    df = _point(variants / "blip" / "none" / "int8", shapes_root, tmp_path, "dtype", "bfloat16")
    assert df["value"].isna().all() and set(df["measure"]) >= {"latency_ms_p50", "gflops_per_sample"}
    assert df["note"].str.contains("dtype bfloat16 does not apply: the variant has runtime steps").all()


def test_attention_point_switches_the_parts_that_can(variants, shapes_root, tmp_path):
    sdpa = _point(variants / "blip2" / "none" / "baseline", shapes_root, tmp_path, "attn_implementation", "sdpa")
    eager = _point(variants / "blip2" / "none" / "baseline", shapes_root, tmp_path, "attn_implementation", "eager")
    assert "language_model=sdpa" in sdpa.set_index("measure").loc["latency_ms_p50", "method"]
    assert "language_model=eager" in eager.set_index("measure").loc["latency_ms_p50", "method"]
    # The FLOP counter counts CPU fused attention as its two matrix products: the same work as eager.
    assert _values(sdpa)["gflops_per_sample"] == pytest.approx(_values(eager)["gflops_per_sample"], rel=1e-9)
    # BLIP's text and vision models have eager attention only: nothing switches, nothing is measured.
    blip = _point(variants / "blip" / "none" / "baseline", shapes_root, tmp_path, "attn_implementation", "sdpa")
    assert blip["value"].isna().all()
    assert blip["note"].str.contains("every part keeps its attention").all()
    assert "text_decoder=eager" in blip["note"].iloc[0]
    flash = _point(
        variants / "blip2" / "none" / "baseline", shapes_root, tmp_path, "attn_implementation", "flash_attention_2"
    )
    assert flash["value"].isna().all()
    expected = "flash_attn package is not installed" if importlib.util.find_spec("flash_attn") is None else "CUDA"
    assert flash["note"].str.contains(expected).all()


def test_compiling_the_layers_keeps_the_outputs(shapes_texts, shapes_test, shapes_root):
    from vlmopt.data.images import open_image
    from vlmopt.profiling.sweep import compiled_graphs

    blip2 = load_model("tiny:blip2-opt", texts=shapes_texts, seed=0)
    images = [open_image(shapes_root, rel) for rel in shapes_test["image"][:2]]
    encoded = blip2.adapter.encode(blip2, images, ["", ""])
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    with torch.inference_mode():
        before = blip2.adapter.generate(blip2, encoded, **kwargs)
    applied = apply_point(blip2, SweepPoint("compile", True), compile_backend="eager")
    assert applied.reason is None and "of 9 transformer layers" in applied.method
    with torch.inference_mode():
        after = blip2.adapter.generate(blip2, encoded, **kwargs)
    assert after == before
    assert compiled_graphs() > 0


def test_scaling_figure(tmp_path):
    rows = []
    for axis, values in (("batch_size", ["1", "4", "16"]), ("dtype", ["float32", "bfloat16"])):
        for task in ("captioning", "vqa"):
            for i, value in enumerate(values):
                missing = axis == "dtype" and value == "bfloat16" and task == "vqa"
                for name, v in (("latency_ms_per_sample_p50", 10.0 / (i + 1)), ("latency_ms_p50", 10.0)):
                    rows.append(
                        {
                            "model": "m",
                            "ft": "none",
                            "variant": "baseline",
                            "task": task,
                            "dataset": "d",
                            "measure": name,
                            "value": None if missing else v,
                            "note": "cannot" if missing else None,
                            "sweep_axis": axis,
                            "sweep_value": value,
                        }
                    )
    efficiency = pd.DataFrame(rows)
    table = sweep_table(efficiency).set_index(["task", "sweep_axis", "sweep_value"])
    assert table.loc[("captioning", "batch_size", "16"), "latency_ms_per_sample_p50"] == pytest.approx(10 / 3)
    assert table.loc[("vqa", "dtype", "bfloat16"), "note"] == "cannot"
    out = scaling_curves(efficiency, tmp_path / "scaling.png")
    assert out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="no sweep rows"):
        scaling_curves(efficiency.assign(sweep_axis=None), tmp_path / "none.png")
