from __future__ import annotations

import io

import pytest
import torch

from vlmopt.compress import apply_runtime_steps, apply_variant, select_modules, serialized_size

ALL = {"method": "dynamic_int8", "part": "all"}


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def test_real_int8_smaller_and_close(toy, inputs) -> None:
    model, parts = toy
    reference = run(model, inputs)
    float_size = serialized_size(model)
    refs = select_modules(model, parts, part="all")
    selected = {ref.name for ref in refs}
    weight_elements = sum(ref.module.weight.numel() for ref in refs)
    manifest = apply_variant(model, parts, [ALL])

    out = run(model, inputs)
    assert not torch.equal(out, reference)
    assert float((out - reference).norm() / reference.norm()) < 0.05
    int8_size = serialized_size(model)
    # 4 -> 1 byte per selected weight element, less per-tensor scales and pickling overhead
    assert float_size - int8_size > 0.75 * 3 * weight_elements
    assert int8_size < 0.6 * float_size

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight
            if name in selected:
                assert weight.qdata.dtype == torch.int8 and weight.qdata.shape == weight.shape
            else:  # patch embedding, language_projection, lm_head
                assert type(weight.data) is torch.Tensor and weight.dtype == torch.float32

    assert manifest["simulated"] is False and manifest["representation"] == "real"
    assert manifest["runtime_steps"] == [
        {
            "method": "dynamic_int8",
            "part": "all",
            "position": "all",
            "role": "both",
            "modules": [],
            "backend": "torchao",
        }
    ]
    step = manifest["steps"][0]
    assert step["runtime"] is True and step["applied"] is True and "torchao" in step["backend"]
    assert {m["name"] for m in step["modules"]} == selected
    assert {m["bits"] for m in step["modules"]} == {8}


def test_reapplied_on_a_fresh_float_model_gives_identical_outputs(toy_factory, inputs) -> None:
    original, parts = toy_factory(0)
    steps = [
        {"method": "uniform", "bits": 4, "part": "bridge"},
        {
            "method": "dynamic_int8",
            "part": "language",
            "role": "attention",
            "modules": ["language_model.lm_head"],
        },
    ]
    manifest = apply_variant(original, parts, steps, defer_runtime=True)
    assert manifest["steps"][1]["applied"] is False
    # what a compressed model folder holds: float weights (uniform already applied) + the manifest
    saved = io.BytesIO()
    torch.save(original.state_dict(), saved)
    names = apply_runtime_steps(original, parts, manifest)
    assert names == [[m["name"] for m in manifest["steps"][1]["modules"]]]
    expected = run(original, inputs)

    fresh, fresh_parts = toy_factory(123)  # different random init, then the saved weights
    saved.seek(0)
    fresh.load_state_dict(torch.load(saved, weights_only=True))
    apply_runtime_steps(fresh, fresh_parts, manifest)
    assert torch.equal(run(fresh, inputs), expected)
    assert manifest["representation"] == "mixed"
    assert fresh.language_model.lm_head.weight.qdata.dtype == torch.int8


def test_deferred_and_direct_manifests_agree(toy_factory) -> None:
    direct = apply_variant(*toy_factory(0), [ALL])
    deferred = apply_variant(*toy_factory(0), [ALL], defer_runtime=True)
    for manifest in (direct, deferred):
        for step in manifest["steps"]:
            step.pop("applied")
            for module in step["modules"]:
                module.pop("weight_type", None)
    assert direct == deferred


def test_overlap_with_uniform_counts_the_smaller_width(toy) -> None:
    model, parts = toy
    steps = [
        {"method": "uniform", "bits": 4, "part": "language", "role": "mlp"},
        {"method": "dynamic_int8", "part": "language"},
    ]
    manifest = apply_variant(model, parts, steps)
    merged = {m["name"]: m for m in manifest["changed_modules"]}
    assert merged["language_model.model.decoder.layers.0.fc1"]["bits"] == 4
    assert merged["language_model.model.decoder.layers.0.self_attn.q_proj"]["bits"] == 8


def test_runtime_steps_refuse_a_model_that_does_not_match(toy_factory) -> None:
    model, parts = toy_factory(0)
    manifest = apply_variant(model, parts, [{"method": "dynamic_int8", "part": "language", "position": "last"}])
    other, other_parts = toy_factory(0)
    shorter = {"language": other_parts["language"][:5]}
    with pytest.raises(ValueError, match="selected different modules than the manifest records"):
        apply_runtime_steps(other, shorter, manifest)
    assert all(type(p.data) is torch.Tensor for p in other.parameters())


def test_quantizing_twice_is_refused(toy) -> None:
    model, parts = toy
    manifest = apply_variant(model, parts, [{"method": "dynamic_int8", "part": "vision"}])
    with pytest.raises(ValueError, match="already holds a Int8Tensor weight"):
        apply_runtime_steps(model, parts, manifest)


def test_fbgemm_backend_swaps_in_cpu_int8_kernels_and_reapplies(toy_factory, inputs) -> None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    model, parts = toy_factory(0)
    reference = run(model, inputs)
    float_size = serialized_size(model)
    selected = {ref.name for ref in select_modules(model, parts, part="language")}
    step = {"method": "dynamic_int8", "part": "language", "backend": "fbgemm"}
    manifest = apply_variant(model, parts, [step], defer_runtime=True)
    saved = io.BytesIO()
    torch.save(model.state_dict(), saved)
    apply_runtime_steps(model, parts, manifest)
    out = run(model, inputs)
    swapped = {name for name, m in model.named_modules() if isinstance(m, DynamicLinear)}
    assert swapped == selected
    assert all(model.get_submodule(n).weight().dtype == torch.qint8 for n in swapped)
    assert not torch.equal(out, reference)
    assert float((out - reference).norm() / reference.norm()) < 0.05
    assert serialized_size(model) < float_size
    assert manifest["runtime_steps"][0]["backend"] == "fbgemm"
    # A fresh float model with the saved weights computes exactly the same after re-applying.
    fresh, fresh_parts = toy_factory(123)
    saved.seek(0)
    fresh.load_state_dict(torch.load(saved, weights_only=True))
    apply_runtime_steps(fresh, fresh_parts, manifest)
    assert torch.equal(run(fresh, inputs), out)


def test_bad_backend_and_non_float32_weights_are_named(toy) -> None:
    model, parts = toy
    with pytest.raises(ValueError, match="backend='cuda' is not allowed"):
        apply_variant(model, parts, [{**ALL, "backend": "cuda"}])
    model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="fbgemm needs float32 weights on the CPU"):
        apply_variant(model, parts, [{**ALL, "backend": "fbgemm"}])
