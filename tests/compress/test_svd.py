"""SVD factorization: real parameter and FLOP savings, Eckart-Young error, rank rules, save and reload."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vlmopt.compress import (
    LowRankLinear,
    SVDConfig,
    apply_variant,
    rank_from_ratio,
    restore_structure,
    select_modules,
)
from vlmopt.compress.svd import factorize_linear
from vlmopt.models import load_model

FAMILIES = ("blip", "blip2-opt")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_inputs(loaded) -> dict[str, torch.Tensor]:
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    prompt = loaded.adapter.prompt("captioning")
    targets = ["a picture of one red circle", "one red circle on the left"]
    return loaded.adapter.encode(loaded, images, [prompt, prompt], targets).inputs


def logits(loaded, inputs) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(**inputs).logits


def linear_with_spectrum(m: int, n: int, singular_values: list[float], seed: int = 0) -> nn.Linear:
    """An ``n -> m`` Linear whose weight has exactly the given singular values (and a random bias)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.zeros(min(m, n), dtype=torch.float64)
    s[: len(singular_values)] = torch.tensor(singular_values, dtype=torch.float64)
    linear = nn.Linear(n, m)
    with torch.no_grad():
        linear.weight.copy_((u[:, : len(s)] * s) @ v[:, : len(s)].T)
        linear.bias.copy_(torch.randn(m, generator=g))
    return linear


def effective_weight(module: nn.Module, n: int) -> torch.Tensor:
    """The matrix a (bias-carrying) linear map applies, read off the identity input."""
    with torch.no_grad():
        eye = torch.eye(n)
        return (module(eye) - module(torch.zeros(1, n))).T


def test_rank_formula() -> None:
    # The CLIP study's matrices: ViT-B/32 in_proj (2304 x 768) and out_proj (768 x 768).
    assert rank_from_ratio(0.5, 2304, 768) == int(0.5 * 2304 * 768 / 3072) == 288
    assert rank_from_ratio(0.5, 768, 768) == 192
    assert rank_from_ratio(0.1, 768, 768) == 38
    assert SVDConfig(part="all", ratio=0.25).rank_for(96, 32) == 6
    assert SVDConfig(part="all", rank=5).rank_for(96, 32) == 5


def test_high_rank_reproduces_and_low_rank_error_is_the_discarded_energy() -> None:
    m, n = 40, 48
    spectrum = [10.0, 7.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.25, 1e-3, 5e-4]
    linear = linear_with_spectrum(m, n, spectrum)
    dense = effective_weight(linear, n)
    s = torch.linalg.svdvals(linear.weight.detach().double())

    high, _ = factorize_linear(linear, 8)  # keeps everything above 1e-3
    high_error = float((effective_weight(high, n) - dense).double().square().sum())
    assert high_error == pytest.approx(float(s[8:].square().sum()), rel=1e-2)
    assert high_error < 2e-6
    x = torch.randn(5, 7, n, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        relative = float((high(x) - linear(x)).norm() / linear(x).norm())
    assert relative < 1e-4

    low, returned = factorize_linear(linear, 3)
    torch.testing.assert_close(returned, s)
    low_error = float((effective_weight(low, n) - dense).double().square().sum())
    discarded = float(s[3:].square().sum())  # 3^2 + 2^2 + 1 + 0.25 + 0.0625 + ... = 14.3125...
    assert low_error == pytest.approx(discarded, rel=1e-5)
    assert low_error > 1e6 * high_error
    # The bias stays exact and on the second factor.
    assert low.down.bias is None and torch.equal(low.up.bias, linear.bias)


def test_factorized_linear_costs_fewer_flops() -> None:
    m, n, rank, tokens = 96, 32, 6, 2 * 7
    linear = linear_with_spectrum(m, n, [1.0] * 32)
    low, _ = factorize_linear(linear, rank)
    x = torch.randn(2, 7, n)
    counts = []
    for module in (linear, low):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(x)
        counts.append(counter.get_total_flops())
    assert counts == [2 * tokens * m * n, 2 * tokens * rank * (m + n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_drops_by_exactly_the_factorization_savings(family) -> None:
    loaded = load_model(f"tiny:{family}")
    model = loaded.model
    refs = select_modules(model, loaded.parts(), part="language", role="mlp")
    expected = {}
    for ref in refs:
        m, n = ref.module.out_features, ref.module.in_features
        rank = int(0.4 * m * n / (m + n))
        expected[ref.name] = (rank, m * n + m, rank * (m + n) + m)
    before = n_params(model)
    manifest = apply_variant(
        model, loaded.parts(), [{"method": "svd", "ratio": 0.4, "part": "language", "role": "mlp"}]
    )
    after = n_params(model)
    saved = sum(b - a for _, b, a in expected.values())
    assert after == before - saved
    # blip: 3 layers x (48->96, 96->48) at ranks 12 and 12; blip2-opt: the same shapes in OPT's fc1/fc2.
    assert saved == 3 * 2 * (48 * 96 - 12 * (48 + 96))

    step = manifest["steps"][0]
    assert step["structure"]["params_before"] == before and step["structure"]["params_after"] == after
    assert {r["name"]: (r["rank"], r["params_before"], r["params_after"]) for r in step["modules"]} == expected
    assert {r["bits"] for r in step["modules"]} == {32}
    for name, (rank, _, _) in expected.items():
        module = model.get_submodule(name)
        assert isinstance(module, LowRankLinear) and module.rank == rank
    assert manifest["parameters"]["model"]["total"] == after
    assert manifest["nominal_size_bytes"] == 4 * after
    assert manifest["representation"] == "real" and manifest["simulated"] is False
    factor_names = {f"{name}.{f}" for name in expected for f in ("down", "up")}
    assert {m["name"] for m in manifest["changed_modules"]} == factor_names
    factor_weights = sum(model.get_submodule(f).weight.numel() for f in factor_names)
    assert manifest["parameters"]["language"]["changed"] == factor_weights


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_factorized_model_reloads_with_identical_outputs(family, tmp_path) -> None:
    loaded = load_model(f"tiny:{family}")
    inputs = model_inputs(loaded)
    dense = logits(loaded, inputs)
    dense_dir = loaded.save(tmp_path / "dense")
    manifest = apply_variant(loaded.model, loaded.parts(), [{"method": "svd", "ratio": 0.5, "part": "all"}])
    factorized = logits(loaded, inputs)
    assert not torch.equal(factorized, dense)
    folder = loaded.save(tmp_path / "svd")
    manifest = json.loads(json.dumps(manifest))  # as read back from manifest.json

    reloaded = load_model(folder)
    names = restore_structure(reloaded.model, manifest, folder)
    assert names == [m["name"] for m in manifest["steps"][0]["modules"]]
    assert all(isinstance(reloaded.model.get_submodule(name), LowRankLinear) for name in names)
    assert n_params(reloaded.model) == n_params(loaded.model) == manifest["parameters"]["model"]["total"]
    assert torch.equal(logits(reloaded, inputs), factorized)
    # The factors, not a dense product, are what is stored.
    dense_bytes = (dense_dir / "model.safetensors").stat().st_size
    assert (folder / "model.safetensors").stat().st_size < dense_bytes - 4 * 0.3 * n_params(loaded.model)


def test_restore_needs_the_recorded_modules_and_factors(tmp_path) -> None:
    loaded = load_model("tiny:blip")
    dense_dir = loaded.save(tmp_path / "dense")
    manifest = apply_variant(loaded.model, loaded.parts(), [{"method": "svd", "rank": 4, "part": "vision"}])
    fresh = load_model(dense_dir)
    with pytest.raises(ValueError, match=r"lacks the factors \['vision_model\.encoder\.layers\.0\.self_attn\.qkv"):
        restore_structure(fresh.model, manifest, dense_dir)
    manifest["steps"][0]["modules"][0]["name"] = "vision_model.encoder.layers.7.mlp.fc1"
    with pytest.raises(ValueError, match=r"layers\.7\.mlp\.fc1, which the loaded model does not have"):
        restore_structure(fresh.model, manifest, dense_dir)
    assert restore_structure(fresh.model, {"steps": []}, dense_dir) == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"part": "all"}, "exactly one of ratio"),
        ({"part": "all", "ratio": 0.5, "rank": 4}, "exactly one of ratio"),
        ({"part": "all", "ratio": 1.0}, "ratio must be a number with 0 < ratio < 1"),
        ({"part": "all", "ratio": 0}, "ratio must be"),
        ({"part": "all", "ratio": True}, "ratio must be"),
        ({"part": "all", "rank": 0}, "rank must be a positive integer"),
        ({"part": "all", "rank": 2.5}, "rank must be a positive integer"),
        ({"part": "all", "ratio": 0.5, "ranks": 4}, "unknown setting.*'ranks'"),
        ({"part": "everything", "ratio": 0.5}, "part='everything' is not allowed"),
    ],
)
def test_bad_settings_name_the_setting(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        SVDConfig.from_dict(settings)


def test_ranks_that_save_nothing_are_refused_before_anything_changes() -> None:
    loaded = load_model("tiny:blip")
    model = loaded.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # vision qkv is 96 x 32: rank 24 costs 24 * 128 = 3072 = 96 * 32.
    with pytest.raises(ValueError, match=r"step 0: svd: rank 24 for vision_model\.encoder\.layers\.0\.self_attn\.qkv"):
        apply_variant(model, loaded.parts(), [{"method": "svd", "rank": 24, "part": "vision"}])
    # 32 x 32 projections: int(0.02 * 1024 / 64) = 0.
    with pytest.raises(ValueError, match=r"rank 0 for vision_model\.encoder\.layers\.0\.self_attn\.qkv"):
        apply_variant(model, loaded.parts(), [{"method": "svd", "ratio": 0.02, "part": "vision", "role": "attention"}])
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
