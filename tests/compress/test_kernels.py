"""Packed variants run through torch's low-bit kernels (vlmopt.compress.kernels): each kernel Linear
computes what the dense weight computes (its own rounding aside), the schemes without a kernel keep
dense weights and say why, and the profile stage's rows carry the kernel and are no longer marked
simulated when every packed Linear ran on it. The CPU versions of the kernels run here; the CUDA
int4 kernel (tinygemm) is reached by the same code on a GPU."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch import nn

from vlmopt.compress import apply_variant
from vlmopt.compress.kernels import Int4Linear, Int8Linear, KernelUse, kernel_for, use_kernels
from vlmopt.compress.saved import load_variant, save_variant
from vlmopt.models import load_model
from vlmopt.pipeline import profile_variant
from vlmopt.tables import summarise

from .conftest import wide_blip2

RTN4_G128 = {"method": "uniform", "bits": 4, "part": "language", "granularity": "group", "group_size": 128}
QUICK = {"warmup": 0, "repeats": 2, "energy_idle_s": 0.0}
CPU = torch.device("cpu")


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_linear_computes_the_grouped_weight(symmetric):
    g = torch.Generator().manual_seed(0)
    rows, columns, group = 32, 256, 64
    levels = torch.randint(0, 16, (rows, columns), generator=g)
    scale = torch.rand(rows, columns // group, generator=g) + 0.1
    zero = torch.zeros(rows, columns // group) if symmetric else torch.randint(-8, 8, (rows, columns // group)).float()
    minimum = -zero * scale
    bias = torch.randn(rows, generator=g)
    weight = ((levels - 8).float().view(rows, -1, group) * scale[..., None] + minimum[..., None]).view(rows, columns)
    layer = Int4Linear(levels, scale, minimum, group, bias)
    x = torch.randn(2, 3, columns, generator=g)
    assert _relative(layer(x), nn.functional.linear(x, weight, bias)) < 1e-6
    with pytest.raises(ValueError, match="divisible by 16"):
        Int4Linear(levels[:24], scale[:24], minimum[:24], group, None)


def test_int8_linear_computes_the_per_channel_weight():
    g = torch.Generator().manual_seed(1)
    levels = torch.randint(-128, 128, (24, 40), generator=g)
    scale = torch.rand(24, generator=g) * 0.01
    layer = Int8Linear(levels, scale, None)
    x = torch.randn(5, 40, generator=g)
    assert _relative(layer(x), x @ (levels.float() * scale[:, None]).T) < 1e-5


@pytest.mark.parametrize(
    ("scheme", "device", "dtype", "kernel", "why"),
    [
        ({"num_bits": 4, "strategy": "group", "group_size": 128}, "cpu", torch.float32, "int4-cpu", None),
        ({"num_bits": 4, "strategy": "group", "group_size": 128}, "cuda", torch.bfloat16, "int4-tinygemm", None),
        ({"num_bits": 4, "strategy": "group", "group_size": 128}, "cuda", torch.float16, None, "takes bfloat16"),
        ({"num_bits": 4, "strategy": "group", "group_size": 16}, "cpu", torch.float32, None, "groups of [32, 64"),
        ({"num_bits": 4, "strategy": "channel"}, "cpu", torch.float32, None, "not channel"),
        ({"num_bits": 8, "strategy": "channel", "symmetric": True}, "cuda", torch.bfloat16, "int8-weight-only", None),
        ({"num_bits": 8, "strategy": "channel", "symmetric": False}, "cpu", torch.float32, None, "not asymmetric"),
        ({"num_bits": 8, "strategy": "group", "group_size": 64, "symmetric": True}, "cpu", torch.float32, None, "gro"),
        ({"num_bits": 3, "strategy": "group", "group_size": 128}, "cpu", torch.float32, None, "3-bit"),
        ({"num_bits": 2, "strategy": "group", "group_size": 128}, "cuda", torch.bfloat16, None, "2-bit"),
    ],
)
def test_which_schemes_have_a_kernel(scheme, device, dtype, kernel, why):
    chosen, reason = kernel_for({"type": "int", **scheme}, torch.device(device), dtype)
    assert chosen == kernel
    assert (reason is None) == (why is None) and (why is None or why in reason)


def _saved(loaded, steps, folder):
    manifest = apply_variant(loaded.model, loaded.parts(), steps)
    save_variant(loaded, folder, manifest, inputs_hash="test")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["storage"]["format"] == "pack-quantized", manifest["storage"]
    return manifest


def _inputs(loaded, shapes_test, shapes_root):
    from vlmopt.data.images import open_image

    images = [open_image(shapes_root, rel) for rel in shapes_test["image"][:2]]
    encoded = loaded.adapter.encode(loaded, images, ["a", "a"])
    return {k: v for k, v in encoded.inputs.items() if k != "labels"}


@pytest.mark.parametrize(
    ("name", "step", "kernel"),
    [
        ("rtn4-asym-g128", RTN4_G128, "int4-cpu"),
        ("rtn4-sym-g128", {**RTN4_G128, "symmetric": True}, "int4-cpu"),
        ("rtn8-channel", {"method": "uniform", "bits": 8, "part": "language", "symmetric": True}, "int8-weight-only"),
    ],
)
def test_a_packed_variant_runs_every_packed_linear_on_a_kernel_with_the_dense_logits(
    name, step, kernel, shapes_texts, shapes_test, shapes_root, tmp_path
):
    folder = tmp_path / name
    manifest = _saved(wide_blip2(shapes_texts), [step], folder)
    dense = load_variant(folder)
    fast = load_variant(folder)
    use = use_kernels(fast.model, folder)
    assert use.kernel == kernel and use.complete and not use.dense
    assert len(use.replaced) == use.packed == manifest["storage"]["packed_modules"] == 6 * 3
    kind = Int8Linear if kernel.startswith("int8") else Int4Linear
    assert all(isinstance(fast.model.get_submodule(n), kind) for n in use.replaced)
    # The integers are kept, not a float copy: no Linear weight is left on the replaced modules.
    assert not any(n.startswith(tuple(f"{r}." for r in use.replaced)) for n, _ in fast.model.named_parameters())
    inputs = _inputs(dense, shapes_test, shapes_root)
    with torch.no_grad():
        want, got = dense.model(**inputs).logits, fast.model(**inputs).logits
    assert _relative(got, want) <= 1e-4
    images, prompts = _images(shapes_test, shapes_root)
    with torch.no_grad():
        tokens = dense.adapter.generate(dense, dense.adapter.encode(dense, images, prompts), **GREEDY)
        fast_tokens = fast.adapter.generate(fast, fast.adapter.encode(fast, images, prompts), **GREEDY)
    assert fast_tokens == tokens


GREEDY = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}


def _images(shapes_test, shapes_root):
    from vlmopt.data.images import open_image

    return [open_image(shapes_root, rel) for rel in shapes_test["image"][:3]], ["a", "a", "a"]


def test_schemes_without_a_kernel_keep_dense_weights_and_say_why(shapes_texts, tmp_path):
    folder = tmp_path / "g16"
    _saved(load_model("tiny:blip2-opt", texts=shapes_texts, seed=0), [{**RTN4_G128, "group_size": 16}], folder)
    loaded = load_variant(folder)
    before = {n: p.clone() for n, p in loaded.model.named_parameters()}
    use = use_kernels(loaded.model, folder)
    assert use.kernel == "none" and not use.replaced and not use.complete and use.packed == 18
    assert set(use.dense) == set(json_targets(folder)) and "groups of [32, 64, 128, 256]" in use.reason
    assert all(torch.equal(p, before[n]) for n, p in loaded.model.named_parameters())
    # Turned off, or a float folder: nothing replaced, the reason given.
    wide = tmp_path / "wide"
    _saved(wide_blip2(shapes_texts), [RTN4_G128], wide)
    off = use_kernels(load_variant(wide).model, wide, enabled=False)
    assert off.packed == 18 and not off.replaced and "turned off" in off.reason
    plain = tmp_path / "plain"
    load_model("tiny:blip2-opt", texts=shapes_texts, seed=0).save(plain)
    assert use_kernels(load_model(plain).model, plain) == KernelUse(reason="the variant is not stored packed")


def json_targets(folder):
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    return [t for group in config["config_groups"].values() for t in group["targets"]]


def test_a_kernel_that_computes_something_else_is_not_used(shapes_texts, tmp_path, monkeypatch):
    folder = tmp_path / "wide"
    _saved(wide_blip2(shapes_texts), [RTN4_G128], folder)
    loaded = load_variant(folder)
    right = Int4Linear.forward
    monkeypatch.setattr(Int4Linear, "forward", lambda self, x: right(self, x) * 1.01)
    use = use_kernels(loaded.model, folder)
    assert not use.replaced and all("check failed: relative error 1.00e-02" in why for why in use.dense.values())


def test_the_profile_rows_carry_the_kernel_and_are_measured_not_simulated(shapes_texts, shapes_root, tmp_path):
    folder = tmp_path / "wide" / "none" / "rtn4"
    _saved(wide_blip2(shapes_texts), [RTN4_G128], folder)
    table = shapes_root / "test.parquet"
    generation = {"max_new_tokens": 3}
    tasks = {"captioning": {"table": table, "root": shapes_root, "dataset": "shapes", "generation": generation}}
    keys = {"model": "wide", "ft": "none", "variant": "rtn4"}
    on = profile_variant(folder, tasks, tmp_path / "on.parquet", keys=keys, settings=QUICK)
    off = profile_variant(folder, tasks, tmp_path / "off.parquet", keys=keys, settings={**QUICK, "kernels": False})
    assert set(on["kernel"]) == {"int4-cpu"} and not on["simulated"].any()
    assert set(off["kernel"]) == {"none"} and off["simulated"].all()
    notes = on.set_index("measure")["note"]
    assert "int4-cpu for 18 of 18 packed Linears" in notes["latency_ms_p50"]
    assert "simulated variant" in off.set_index("measure")["note"]["latency_ms_p50"]
    # The kernel's products count as the matrix products they replace.
    flops = {m: v for m, v in zip(on["measure"], on["value"], strict=True)}
    dense_flops = {m: v for m, v in zip(off["measure"], off["value"], strict=True)}
    assert flops["gflops_per_sample"] == pytest.approx(dense_flops["gflops_per_sample"], rel=1e-9)

    scores = pd.DataFrame([{**keys, "task": "captioning", "dataset": "shapes", "metric": "CIDEr", "value": 1.0}])
    manifest = {"model": "wide", "ft": "none", "variant": "rtn4", "simulated": True}
    summary = summarise(scores, [manifest], efficiency=on)
    assert summary.loc[0, "kernel"] == "int4-cpu" and not summary.loc[0, "simulated"]
    summary = summarise(scores, [manifest], efficiency=off)
    assert summary.loc[0, "kernel"] == "none" and summary.loc[0, "simulated"]
