"""Dynamic int8 and SVD factorization make a model smaller and faster on the CPU: the direction, not a threshold.

At the default tiny widths (hidden 32 to 48) per-call overheads dominate, and both methods run
slower than float32 (benchmarks/README.md). The model here is a BLIP captioning model of the tiny
layout with a narrow vision encoder and a wide two-layer text decoder (hidden 256, MLP 8192), so
that the decoder's Linear layers, mostly its MLPs, take most of the time of a generation. On the
2-core development machine, on one thread, generating 8 tokens for 24 images took about 120 ms in
float32, about 1.9x less with dynamic int8 (all parts, fbgemm) and about 1.5x less with the
language MLPs factorized at ratio 0.5 (the study's ``svd-language-mlp``), margins that noise does
not close.

Each model takes the study's path: the float32 model is saved, compressed by ``compress_model``,
reloaded by ``load_variant`` and profiled by ``profile_variant``. Sizes and parameter counts are
compared with what the method promises, computed here from the float32 model's shapes. Latency is
compared on the call that ``profile_variant`` times (exactly 8 new tokens for one batch, greedy),
on one thread, in interleaved rounds (the variants take turns, the order reversed every other
round), each round the median of a few runs: per variant the median over rounds must be below the
baseline's, and so must the variant in more than half of the rounds.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
    BlipProcessor,
)

from vlmopt.compress.saved import load_variant
from vlmopt.data.images import open_image
from vlmopt.models import get_family
from vlmopt.models.base import LoadedModel
from vlmopt.models.tokenizer import train_word_tokenizer
from vlmopt.pipeline import compress_model
from vlmopt.profiling.latency import measure_latency
from vlmopt.profiling.variant import profile_variant
from vlmopt.tasks import get_task

IMAGE_SIZE = 32
HIDDEN = 256
INTERMEDIATE = 8192
TEXT_LAYERS = 2
TASK = "captioning"
NEW_TOKENS = 8
BATCH = 24
SETTINGS = {"batch_size": BATCH, "warmup": 1, "repeats": 3, "energy_idle_s": 0.0}
GENERATION = {"max_new_tokens": NEW_TOKENS, "num_beams": 1}
ROUNDS = 7
RUNS_PER_ROUND = 3
SVD_RATIO = 0.5
VARIANTS = {
    "baseline": [],
    "int8": [{"method": "dynamic_int8", "part": "all", "backend": "fbgemm"}],
    "svd": [{"method": "svd", "ratio": SVD_RATIO, "part": "language", "role": "mlp"}],
}
#: Transformer layers of the two parts (what ``part: all`` selects in BLIP), and the language MLPs.
LAYER_PREFIXES = ("vision_model.encoder.layers.", "text_decoder.bert.encoder.layer.")
LANGUAGE_MLP = re.compile(r"text_decoder\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.dense")


def wide_blip(texts: list[str], seed: int = 0) -> LoadedModel:
    """A random-init BLIP captioning model like ``tiny:blip``, with a wide text decoder."""
    adapter = get_family("blip")
    tokenizer = train_word_tokenizer([*texts, adapter.prompts["vqa"]])
    # The tiny layout (vision width 32, word tokenizer, 64 positions), with one vision layer and a
    # wide text decoder.
    vision, text = adapter.tiny_configs(tokenizer, IMAGE_SIZE)
    vision.num_hidden_layers = 1
    text.hidden_size, text.intermediate_size = HIDDEN, INTERMEDIATE
    text.num_hidden_layers, text.num_attention_heads = TEXT_LAYERS, 4
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text))
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer,
    )
    return LoadedModel(model.eval(), processor, adapter.name, adapter, source="wide:blip")


@dataclass
class Variant:
    loaded: LoadedModel
    manifest: dict[str, Any]
    rows: dict[str, float | None]
    notes: dict[str, Any]
    latency_ms: list[float]


def _generation_call(loaded: LoadedModel, images: list, table: pd.DataFrame) -> Callable[[], Any]:
    """What ``profile_variant`` times: one encoded batch, exactly ``NEW_TOKENS`` new tokens, greedy."""
    encoded = loaded.adapter.encode(loaded, images, get_task(TASK).prompts(table, loaded.adapter))
    return lambda: loaded.adapter.generate(
        loaded, encoded, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1
    )


def _interleaved_medians(calls: dict[str, Callable[[], Any]]) -> dict[str, list[float]]:
    """Per call, the median of ``RUNS_PER_ROUND`` runs in each of ``ROUNDS`` rounds the calls take turns in."""
    names = list(calls)
    for call in calls.values():
        call()
    medians: dict[str, list[float]] = {name: [] for name in names}
    for r in range(ROUNDS):
        for name in names if r % 2 == 0 else names[::-1]:
            medians[name].append(measure_latency(calls[name], warmup=0, repeats=RUNS_PER_ROUND).median_ms)
    return medians


@pytest.fixture(scope="module")
def variants(shapes_texts, shapes_test, shapes_root, tmp_path_factory) -> dict[str, Variant]:
    table = shapes_test.head(BATCH)
    images = [open_image(shapes_root, rel) for rel in table["image"]]
    base_dir = tmp_path_factory.mktemp("wide") / "blip-wide"
    threads = torch.get_num_threads()
    # One thread: timings are steadier while other work shares the machine, and this machine's
    # threaded LAPACK takes several times longer for the SVD of these weights than one thread does.
    torch.set_num_threads(1)
    try:
        wide_blip(shapes_texts).save(base_dir)
        loaded, manifests, profiles = {}, {}, {}
        for name, steps in VARIANTS.items():
            folder = base_dir.parent / name
            compress_model(base_dir, folder, steps=steps, device="cpu")
            loaded[name] = load_variant(folder)
            manifests[name] = json.loads((folder / "manifest.json").read_text())
            profiles[name] = profile_variant(
                loaded[name],
                table,
                shapes_root,
                TASK,
                settings=SETTINGS,
                generation=GENERATION,
                manifest=manifests[name],
            )
        with torch.inference_mode():
            latency = _interleaved_medians({name: _generation_call(m, images, table) for name, m in loaded.items()})
    finally:
        torch.set_num_threads(threads)
    out = {}
    for name, df in profiles.items():
        rows = {m: (None if pd.isna(v) else float(v)) for m, v in zip(df["measure"], df["value"], strict=True)}
        notes = dict(zip(df["measure"], df["note"], strict=True))
        out[name] = Variant(loaded[name], manifests[name], rows, notes, latency[name])
    _report(out)
    return out


def _report(out: dict[str, Variant]) -> None:
    base = statistics.median(out["baseline"].latency_ms)
    for name, v in out.items():
        median = statistics.median(v.latency_ms)
        print(
            f"{name}: rounds {[round(x, 1) for x in v.latency_ms]} ms, median {median:.1f} ms "
            f"({base / median:.2f}x), profile latency_ms_p50 {v.rows['latency_ms_p50']:.1f} ms, "
            f"size {v.rows['size_bytes']:.0f} B, params {v.rows['params']:.0f}"
        )


def _assert_faster(variant: Variant, baseline: Variant, name: str) -> None:
    ours, theirs = variant.latency_ms, baseline.latency_ms
    faster = sum(a < b for a, b in zip(ours, theirs, strict=True))
    detail = f"{name} rounds {ours} ms vs baseline {theirs} ms"
    assert statistics.median(ours) < statistics.median(theirs), detail
    assert faster > len(ours) / 2, detail


def _dense_linears(loaded: LoadedModel) -> dict[str, nn.Linear]:
    return {name: m for name, m in loaded.model.named_modules() if type(m) is nn.Linear}


def test_dynamic_int8_is_smaller_and_faster(variants):
    base, int8 = variants["baseline"], variants["int8"]
    # Every Linear of the transformer layers of both parts holds int8 weights (one byte each).
    quantized = {name: m for name, m in _dense_linears(base.loaded).items() if name.startswith(LAYER_PREFIXES)}
    int8_linears = {name for name, m in int8.loaded.model.named_modules() if isinstance(m, DynamicInt8Linear)}
    assert int8_linears == set(quantized)
    weight_elements = sum(m.weight.numel() for m in quantized.values())
    assert weight_elements > 0.9 * base.rows["params"]
    dense_bytes = 4 * base.rows["params"]
    assert int8.manifest["nominal_size_bytes"] == dense_bytes - 3 * weight_elements
    # Serialized: one byte per quantized weight plus a float64 scale and an int64 zero point per
    # output channel, the rest float32 as before, and a little pickling overhead.
    channels = sum(m.out_features for m in quantized.values())
    expected = base.rows["size_bytes"] - 3 * weight_elements + 16 * channels
    assert int8.rows["size_bytes"] < base.rows["size_bytes"]
    assert int8.rows["size_bytes"] == pytest.approx(expected, rel=0.01)
    assert int8.rows["size_bytes"] < 0.4 * base.rows["size_bytes"]
    _assert_faster(int8, base, "int8")
    # The profile's own latency rows are there; int8 Linear layers are invisible to the FLOP counter.
    assert int8.rows["latency_ms_p50"] > 0 and base.rows["latency_ms_p50"] > 0
    assert "lower bound" in int8.notes["gflops_per_sample"]


def test_svd_is_smaller_and_faster(variants):
    base, svd = variants["baseline"], variants["svd"]
    mlp = {name: m for name, m in _dense_linears(base.loaded).items() if LANGUAGE_MLP.fullmatch(name)}
    assert len(mlp) == 2 * TEXT_LAYERS
    saved = 0
    for name, dense in mlp.items():
        m, n = dense.out_features, dense.in_features
        rank = int(SVD_RATIO * m * n / (m + n))
        low = svd.loaded.model.get_submodule(name)
        assert (low.down.weight.shape, low.up.weight.shape) == ((rank, n), (m, rank)), name
        # The factors hold about half of the weight's parameters (the bias is kept as it is).
        assert rank * (m + n) == pytest.approx(SVD_RATIO * m * n, rel=0.01)
        saved += m * n - rank * (m + n)
    assert svd.rows["params"] == base.rows["params"] - saved
    assert sum(p.numel() for p in svd.loaded.model.parameters()) == svd.rows["params"]
    assert base.rows["params"] == sum(p.numel() for p in base.loaded.model.parameters())
    # float32 throughout: the serialized size falls by 4 bytes per parameter removed.
    assert svd.rows["size_bytes"] < base.rows["size_bytes"]
    assert base.rows["size_bytes"] - svd.rows["size_bytes"] == pytest.approx(4 * saved, rel=0.01)
    # Each decoding step of a sample runs every factorized layer once: 2 FLOPs per multiply-add saved.
    per_token = base.rows["gflops_per_token_per_sample"] - svd.rows["gflops_per_token_per_sample"]
    assert per_token == pytest.approx(2 * saved / 1e9, rel=1e-6)
    assert svd.rows["gflops_per_sample"] < base.rows["gflops_per_sample"]
    _assert_faster(svd, base, "svd")
    assert svd.rows["latency_ms_p50"] > 0
