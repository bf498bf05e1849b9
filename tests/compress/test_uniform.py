from __future__ import annotations

import logging

import pytest
import torch

from vlmopt.compress import NothingSelectedError, UniformConfig, apply_variant, select_modules
from vlmopt.compress.quant import CHANGE_TOLERANCE, QuantSpec, fake_quantize, grid_step

L = "language_model.model.decoder.layers"


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed_params(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}


@pytest.mark.parametrize(
    "step",
    [
        {"part": "language", "role": "attention"},
        {"part": "vision", "position": "middle", "role": "mlp"},
        {"part": "bridge", "position": "last"},
        {"part": "all", "position": "first", "granularity": "per_tensor"},
        {"part": "language", "granularity": "group", "group_size": 16, "symmetric": True},
    ],
)
def test_changes_exactly_the_selected_weights(toy, step) -> None:
    model, parts = toy
    selection = {k: step[k] for k in ("part", "position", "role") if k in step}
    expected = {f"{ref.name}.weight" for ref in select_modules(model, parts, **selection)}
    before = snapshot(model)
    manifest = apply_variant(model, parts, [{"method": "uniform", "bits": 4, **step}])
    assert changed_params(model, before) == expected
    records = manifest["steps"][0]["modules"]
    assert {f"{m['name']}.weight" for m in records} == expected
    assert all(m["elements_changed"] > 0 and m["bits"] == 4 for m in records)


def test_weights_equal_fake_quantized_originals(toy) -> None:
    model, parts = toy
    before = snapshot(model)
    apply_variant(model, parts, [{"method": "uniform", "bits": 3, "part": "language", "symmetric": True}])
    name = f"{L}.4.fc1.weight"
    expected = fake_quantize(before[name], QuantSpec(3, "per_channel", symmetric=True))
    assert torch.equal(dict(model.named_parameters())[name], expected)
    assert torch.equal(dict(model.named_parameters())[f"{L}.4.fc1.bias"], before[f"{L}.4.fc1.bias"])


def test_fewer_bits_move_outputs_more(toy_factory, inputs) -> None:
    reference = toy_factory(0)[0](*inputs)
    deviation = {}
    for bits in (2, 4, 8):
        model, parts = toy_factory(0)
        apply_variant(model, parts, [{"method": "uniform", "bits": bits, "part": "all"}])
        with torch.no_grad():
            deviation[bits] = float((model(*inputs) - reference).norm() / reference.norm())
    assert deviation[2] > deviation[4] > deviation[8] > 0
    assert deviation[8] < 0.02


def test_full_settings_recorded_after_defaults(toy) -> None:
    model, parts = toy
    manifest = apply_variant(model, parts, [{"method": "uniform", "bits": 8, "part": "language"}])
    assert manifest["steps"][0]["settings"] == {
        "method": "uniform",
        "part": "language",
        "position": "all",
        "role": "both",
        "modules": [],
        "bits": 8,
        "granularity": "per_channel",
        "group_size": None,
        "symmetric": False,
        "activation_bits": None,
    }
    assert manifest["simulated"] is True and manifest["representation"] == "simulated"
    assert manifest["runtime_steps"] == []


def _grid_weights(model: torch.nn.Module, names: list[str]) -> None:
    """Set weights to integers -3..4 with both ends in every row: exact at 3 bits per channel."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in names:
            w = model.get_submodule(name).weight
            grid = torch.randint(-3, 5, w.shape, generator=g).to(w.dtype)
            grid[:, 0], grid[:, 1] = -3.0, 4.0
            w.copy_(grid)


def test_step_that_changes_nothing_is_an_error(toy) -> None:
    model, parts = toy
    _grid_weights(model, [f"{L}.5.fc1", f"{L}.5.fc2"])
    one_layer = {"language": parts["language"][5:]}
    before = snapshot(model)
    with pytest.raises(ValueError, match="step 0: uniform: .* selected 2 modules but changed no weight"):
        apply_variant(model, one_layer, [{"method": "uniform", "bits": 3, "part": "language", "role": "mlp"}])
    assert changed_params(model, before) == set()


@pytest.mark.parametrize(
    "settings",
    [
        {"bits": 8},
        {"bits": 4},
        {"bits": 4, "granularity": "group", "group_size": 16},
    ],
)
def test_same_step_twice_is_refused(toy, settings) -> None:
    """Rounding weights already on the grid again moves some by float rounding (a tiny fraction of
    a grid step), which is not a change: the second application changed nothing."""
    model, parts = toy
    step = {"method": "uniform", "part": "language", **settings}
    records = apply_variant(model, parts, [step])["steps"][0]["modules"]
    weights = {m["name"]: model.get_submodule(m["name"]).weight.detach() for m in records}
    # A real rounding moves nearly every element (all but a block's extremes, which are on the grid).
    assert sum(m["elements_changed"] for m in records) > 0.9 * sum(w.numel() for w in weights.values())
    once = snapshot(model)
    with pytest.raises(ValueError, match=r"step 0: uniform: .* selected 36 modules but changed no weight"):
        apply_variant(model, parts, [step])
    spec = UniformConfig(**{k: v for k, v in step.items() if k != "method"}).quant_spec()
    moves = [
        ((w - once[f"{name}.weight"]).abs() / grid_step(once[f"{name}.weight"], spec)) for name, w in weights.items()
    ]
    assert any(bool((m > 0).any()) for m in moves)
    assert max(float(m.max()) for m in moves) < CHANGE_TOLERANCE


def test_exactly_representable_module_is_recorded(toy, caplog) -> None:
    model, parts = toy
    _grid_weights(model, [f"{L}.5.fc1"])
    with caplog.at_level(logging.WARNING, logger="vlmopt.compress.uniform"):
        manifest = apply_variant(
            model,
            parts,
            [{"method": "uniform", "bits": 3, "part": "language", "position": "last", "role": "mlp"}],
        )
    by_name = {m["name"]: m for m in manifest["steps"][0]["modules"]}
    assert by_name[f"{L}.5.fc1"]["elements_changed"] == 0
    assert by_name[f"{L}.5.fc2"]["elements_changed"] > 0
    assert f"{L}.5.fc1 was already exactly representable" in caplog.text


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (
            {"bits": 4, "part": "language", "bitz": 4},
            r"unknown setting\(s\) 'bitz' for method 'uniform'; allowed: .*bits",
        ),
        ({"bits": 4, "part": "language", "layer_type": "MLP"}, "'layer_type'.*allowed: part, position, role"),
        ({"bits": 16, "part": "language"}, "bits=16 means 'leave unquantized'"),
        ({"bits": 9, "part": "language"}, "bits=9 is not allowed"),
        ({"bits": 4, "part": "language", "position": "begin"}, "position='begin'.*first, middle, last, all"),
        ({"bits": 4, "part": "language", "granularity": "group"}, "group_size"),
        ({"bits": 4}, "needs setting\\(s\\) 'part'"),
        ({"part": "language"}, "needs setting\\(s\\) 'bits'"),
        ({"bits": 4, "part": "language", "modules": "lm_head"}, "modules must be a list"),
        ({"bits": 4, "part": "language", "modules": ["re:("]}, "not a valid regex"),
    ],
)
def test_config_errors_name_the_key(settings, match) -> None:
    with pytest.raises(ValueError, match=match):
        UniformConfig.from_dict(settings)


def test_config_is_frozen() -> None:
    config = UniformConfig.from_dict({"bits": 4, "part": "vision"})
    with pytest.raises(AttributeError):
        config.bits = 2  # type: ignore[misc]


def test_empty_selection_in_a_step_names_method_and_setting(toy) -> None:
    model, parts = toy
    blip_like = {"vision": parts["vision"], "language": parts["language"]}
    with pytest.raises(NothingSelectedError, match="step 0: uniform: no Linear module matches part='bridge'"):
        apply_variant(model, blip_like, [{"method": "uniform", "bits": 4, "part": "bridge"}])


def test_tied_weight_outside_the_selection_is_refused(toy) -> None:
    model, parts = toy
    lm = model.language_model
    lm.lm_head.weight = lm.model.decoder.embed_tokens.weight
    before = snapshot(model)
    step = {"method": "uniform", "bits": 4, "part": "language", "modules": ["language_model.lm_head"]}
    with pytest.raises(ValueError, match="shared with \\['language_model.model.decoder.embed_tokens.weight'\\]"):
        apply_variant(model, parts, [step])
    assert changed_params(model, before) == set()
