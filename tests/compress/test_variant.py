from __future__ import annotations

import json

import pytest
import torch

from vlmopt.compress import METHODS, RUNTIME_METHODS, apply_variant, serialized_size, write_manifest


def lin(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


# The toy model's sizes, counted by hand (vision width 32, bridge 24, language 40, 6 layers each).
VISION_LAYER = lin(32, 96) + lin(32, 32) + lin(32, 64) + lin(64, 32) + 2 * 2 * 32
BRIDGE_LAYER = (
    4 * lin(24, 24) + 2 * 24  # self attention: query, key, value, output.dense, LayerNorm
    + 2 * lin(24, 24) + 2 * lin(32, 24) + 2 * 24  # cross attention: key/value read the 32-wide image
    + 2 * (lin(24, 48) + lin(48, 24))  # intermediate/output and intermediate_query/output_query
)  # fmt: skip
LANGUAGE_LAYER = 4 * lin(40, 40) + lin(40, 80) + lin(80, 40) + 2 * 2 * 40
OTHER = (
    lin(12, 32)  # patch embedding
    + 2 * 32  # post_layernorm
    + 4 * 24  # query tokens
    + 2 * 24  # qformer layernorm
    + lin(24, 40)  # language_projection
    + 50 * 40  # embed_tokens
    + lin(40, 50, bias=False)  # lm_head
)  # fmt: skip
TOTALS = {
    "vision": 6 * VISION_LAYER,
    "bridge": 6 * BRIDGE_LAYER,
    "language": 6 * LANGUAGE_LAYER,
    "other": OTHER,
}
MODEL = sum(TOTALS.values())


def test_hand_counts_match_the_toy(toy) -> None:
    model, _ = toy
    assert MODEL == sum(p.numel() for p in model.parameters()) == 196_520


def test_baseline_changes_nothing(toy, inputs) -> None:
    model, parts = toy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    manifest = apply_variant(model, parts, [])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert manifest["methods"] == [] and manifest["changed_modules"] == []
    assert manifest["representation"] == "baseline" and manifest["simulated"] is False
    assert manifest["fraction_changed"] == {
        "vision": 0.0,
        "bridge": 0.0,
        "language": 0.0,
        "other": 0.0,
        "model": 0.0,
    }
    assert manifest["nominal_bits_per_parameter"] == 32.0
    assert manifest["nominal_size_bytes"] == manifest["dense_size_bytes"] == 4 * MODEL
    assert {g: p["total"] for g, p in manifest["parameters"].items()} == {**TOTALS, "model": MODEL}


def test_fractions_and_nominal_size(toy) -> None:
    model, parts = toy
    steps = [
        {"method": "uniform", "bits": 4, "part": "language", "role": "attention"},
        {"method": "uniform", "bits": 8, "part": "vision", "position": "first", "role": "mlp"},
        {
            "method": "uniform",
            "bits": 2,
            "part": "language",
            "position": "last",
            "modules": ["language_projection"],
        },
    ]
    manifest = apply_variant(model, parts, steps)
    language_attention = 6 * 4 * 40 * 40
    vision_mlp_first = 2 * (32 * 64 + 64 * 32)
    language_last_mlp = 2 * (40 * 80 + 80 * 40)  # attention of layers 4, 5 already counted
    projection = 24 * 40
    changed = {
        "vision": vision_mlp_first,
        "bridge": 0,
        "language": language_attention + language_last_mlp,
        "other": projection,
    }
    for group, total in TOTALS.items():
        assert manifest["parameters"][group]["changed"] == changed[group]
        assert manifest["fraction_changed"][group] == pytest.approx(changed[group] / total)
    assert manifest["fraction_changed"]["model"] == pytest.approx(sum(changed.values()) / MODEL)

    # weight bits: attention of layers 0-3 at 4, of layers 4-5 at min(4, 2) = 2, last-third mlp and
    # the projection at 2, first-third vision mlp at 8; everything else stays at 32
    at_2 = 2 * 4 * 1600 + language_last_mlp + projection
    at_4 = 4 * 4 * 1600
    at_8 = vision_mlp_first
    bits = 32 * (MODEL - at_2 - at_4 - at_8) + 2 * at_2 + 4 * at_4 + 8 * at_8
    assert manifest["nominal_bits_per_parameter"] == pytest.approx(bits / MODEL)
    assert manifest["nominal_size_bytes"] == bits // 8
    assert manifest["nominal_compression_ratio"] == pytest.approx(4 * MODEL / (bits / 8))

    merged = {m["name"]: m for m in manifest["changed_modules"]}
    assert manifest["n_changed_modules"] == len(merged) == 24 + 4 + 4 + 1
    q4 = merged["language_model.model.decoder.layers.4.self_attn.q_proj"]
    assert (q4["bits"], q4["methods"], q4["position"], q4["attention_kind"]) == (
        2,
        ["uniform", "uniform"],
        "last",
        "self",
    )
    assert merged["language_projection"]["part"] == "other"
    assert manifest["methods"] == ["uniform", "uniform", "uniform"]


def test_manifest_is_json_and_written_atomically(toy, tmp_path) -> None:
    model, parts = toy
    manifest = apply_variant(model, parts, [{"method": "uniform", "bits": 4, "part": "bridge"}])
    size = serialized_size(model)
    assert size > 4 * MODEL  # fake quantization keeps float storage
    out = write_manifest(tmp_path / "v" / "manifest.json", manifest, serialized_size_bytes=size, inputs_hash="abc")
    loaded = json.loads(out.read_text())
    assert loaded["serialized_size_bytes"] == size and loaded["inputs_hash"] == "abc"
    assert loaded["steps"] == manifest["steps"]
    assert [p.name for p in out.parent.iterdir()] == ["manifest.json"]
    # a manifest that cannot be written leaves the old file alone and no temporary file behind
    with pytest.raises(ValueError):
        write_manifest(out, {**manifest, "bad": float("nan")}, serialized_size_bytes=1, inputs_hash="x")
    assert json.loads(out.read_text())["inputs_hash"] == "abc"
    assert [p.name for p in out.parent.iterdir()] == ["manifest.json"]


def test_unknown_method_names_the_allowed_ones(toy) -> None:
    model, parts = toy
    with pytest.raises(ValueError, match="step 1: unknown method 'gptqq'; methods: uniform, dynamic_int8"):
        apply_variant(model, parts, [{"method": "uniform", "bits": 4, "part": "vision"}, {"method": "gptqq"}])
    with pytest.raises(ValueError, match="has no 'method'"):
        apply_variant(model, parts, [{"bits": 4}])
    assert set(METHODS) == {
        "uniform",
        "dynamic_int8",
        "gptq",
        "awq",
        "svd",
        "prune_layers",
        "prune_heads",
        "lora",
        "precision",
    }
    assert RUNTIME_METHODS == {"dynamic_int8"}


def test_steps_are_validated_before_any_runs(toy) -> None:
    model, parts = toy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = [
        {"method": "uniform", "bits": 4, "part": "vision"},
        {"method": "uniform", "bits": 4, "prat": "bridge"},
    ]
    with pytest.raises(ValueError, match="step 1: unknown setting\\(s\\) 'prat'"):
        apply_variant(model, parts, steps)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_runtime_steps_must_come_last(toy) -> None:
    model, parts = toy
    steps = [
        {"method": "dynamic_int8", "part": "language"},
        {"method": "uniform", "bits": 4, "part": "vision"},
    ]
    with pytest.raises(ValueError, match="runtime steps must come last"):
        apply_variant(model, parts, steps)
