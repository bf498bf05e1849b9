"""Layer pruning: exact parameter savings, config kept in step, identical outputs after save and reload."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import Blip2Config, Blip2ForConditionalGeneration

from vlmopt.compress import LowRankLinear, PruneLayersConfig, apply_variant, restore_structure
from vlmopt.models import get_family, load_model

SUB_CONFIG = {
    ("blip", "vision"): "vision_config",
    ("blip", "language"): "text_config",
    ("blip2-opt", "vision"): "vision_config",
    ("blip2-opt", "bridge"): "qformer_config",
    ("blip2-opt", "language"): "text_config",
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_inputs(loaded) -> dict[str, torch.Tensor]:
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    prompt = loaded.adapter.prompt("captioning")
    return loaded.adapter.encode(
        loaded, images, [prompt, prompt], ["a red circle", "one red circle on the left"]
    ).inputs


def logits(loaded, inputs) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(**inputs).logits


def generate(loaded) -> list[str]:
    rng = np.random.RandomState(1)
    images = [Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8))]
    encoded = loaded.adapter.encode(loaded, images, [loaded.adapter.prompt("captioning")])
    return loaded.adapter.generate(loaded, encoded, max_new_tokens=6, num_beams=1, do_sample=False)


@pytest.mark.parametrize(("family", "part"), list(SUB_CONFIG))
def test_parameter_count_drops_by_exactly_the_dropped_layers(family, part) -> None:
    loaded = load_model(f"tiny:{family}")
    model = loaded.model
    layers = loaded.parts()[part]
    dropped_params = n_params(layers[1][1])
    before = n_params(model)
    manifest = apply_variant(model, loaded.parts(), [{"method": "prune_layers", "part": part, "layers": [1]}])
    after = n_params(model)
    assert after == before - dropped_params
    assert len(loaded.parts()[part]) == 2
    assert getattr(model.config, SUB_CONFIG[family, part]).num_hidden_layers == 2

    structure = manifest["steps"][0]["structure"]
    assert structure["dropped_layers"] == [1] and structure["dropped_names"] == [layers[1][0]]
    assert (structure["layers_before"], structure["layers_after"]) == (3, 2)
    assert structure["config_key"] == f"{SUB_CONFIG[family, part]}.num_hidden_layers"
    assert (structure["params_before"], structure["params_after"]) == (before, after)
    assert structure["part_params_before"] - structure["part_params_after"] == dropped_params
    assert manifest["steps"][0]["modules"] and {m["layer_index"] for m in manifest["steps"][0]["modules"]} == {1}
    assert manifest["parameters"]["model"]["total"] == after and manifest["nominal_size_bytes"] == 4 * after
    # Layer 2 is now called layer 1; nothing that remains was changed.
    assert manifest["changed_modules"] == [] and manifest["fraction_changed"]["model"] == 0.0


def test_pruned_blip2_reloads_with_identical_logits_and_generation(tmp_path) -> None:
    loaded = load_model("tiny:blip2-opt")
    inputs = model_inputs(loaded)
    full = logits(loaded, inputs)
    steps = [
        {"method": "prune_layers", "part": "bridge", "drop_last": 1},
        {"method": "prune_layers", "part": "language", "layers": [1]},
        {"method": "prune_layers", "part": "vision", "keep": 2},
    ]
    manifest = apply_variant(loaded.model, loaded.parts(), steps)
    pruned = logits(loaded, inputs)
    assert not torch.equal(pruned, full)
    # The OPT layer that moved down now uses KV-cache slot 1.
    assert [layer.self_attn.layer_idx for layer in loaded.model.language_model.model.decoder.layers] == [0, 1]
    text = generate(loaded)

    reloaded = load_model(loaded.save(tmp_path / "pruned"))
    config = reloaded.model.config
    assert (
        config.vision_config.num_hidden_layers,
        config.qformer_config.num_hidden_layers,
        config.text_config.num_hidden_layers,
    ) == (2, 2, 2)
    assert n_params(reloaded.model) == n_params(loaded.model) == manifest["parameters"]["model"]["total"]
    assert torch.equal(logits(reloaded, inputs), pruned)
    assert generate(reloaded) == text


def test_pruned_blip_reloads_with_identical_logits(tmp_path) -> None:
    loaded = load_model("tiny:blip")
    inputs = model_inputs(loaded)
    steps = [
        {"method": "prune_layers", "part": "language", "layers": [0, 2]},
        {"method": "prune_layers", "part": "vision", "drop_last": 2},
    ]
    apply_variant(loaded.model, loaded.parts(), steps)
    pruned = logits(loaded, inputs)
    assert loaded.model.text_decoder.bert.encoder.layer[0].layer_num == 0
    text = generate(loaded)
    reloaded = load_model(loaded.save(tmp_path / "pruned"))
    assert reloaded.model.config.text_config.num_hidden_layers == 1
    assert reloaded.model.config.vision_config.num_hidden_layers == 1
    assert torch.equal(logits(reloaded, inputs), pruned)
    assert generate(reloaded) == text


def test_svd_then_pruning_below_it_reloads_under_the_new_names(tmp_path) -> None:
    loaded = load_model("tiny:blip2-opt")
    inputs = model_inputs(loaded)
    steps = [
        {"method": "uniform", "bits": 4, "part": "language", "position": "last", "role": "attention"},
        {"method": "svd", "ratio": 0.5, "part": "language", "position": "last", "role": "mlp"},
        {"method": "prune_layers", "part": "language", "layers": [0]},
    ]
    manifest = apply_variant(loaded.model, loaded.parts(), steps)
    prefix = "language_model.model.decoder.layers"
    assert manifest["steps"][1]["modules"][0]["name"] == f"{prefix}.2.fc1"  # as named when it ran
    assert isinstance(loaded.model.get_submodule(f"{prefix}.1.fc1"), LowRankLinear)
    changed = {m["name"]: m["methods"] for m in manifest["changed_modules"]}
    assert changed == {
        **{f"{prefix}.1.self_attn.{p}": ["uniform"] for p in ("q_proj", "k_proj", "v_proj", "out_proj")},
        **{f"{prefix}.1.{fc}.{f}": ["svd"] for fc in ("fc1", "fc2") for f in ("down", "up")},
    }
    expected = logits(loaded, inputs)
    folder = loaded.save(tmp_path / "variant")
    reloaded = load_model(folder)
    names = restore_structure(reloaded.model, json.loads(json.dumps(manifest)), folder)
    assert names == [f"{prefix}.1.fc1", f"{prefix}.1.fc2"]
    assert torch.equal(logits(reloaded, inputs), expected)


def test_qformer_cross_attention_pattern_is_kept_or_refused(tmp_path) -> None:
    tiny = load_model("tiny:blip2-opt").model.config.to_dict()
    tiny["qformer_config"]["cross_attention_frequency"] = 2
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(Blip2Config(**tiny)).eval()
    adapter = get_family("blip2-opt")
    assert [layer.has_cross_attention for layer in model.qformer.encoder.layer] == [True, False, True]
    with pytest.raises(ValueError, match=r"cross_attention_frequency=2 cannot describe"):
        apply_variant(model, adapter.parts(model), [{"method": "prune_layers", "part": "bridge", "layers": [1]}])
    assert len(model.qformer.encoder.layer) == 3  # refused before anything changed

    apply_variant(model, adapter.parts(model), [{"method": "prune_layers", "part": "bridge", "drop_last": 1}])
    model.save_pretrained(tmp_path / "q2")
    reloaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "q2").eval()
    assert [layer.has_cross_attention for layer in reloaded.qformer.encoder.layer] == [True, False]
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.get_image_features(pixel_values=pixels).pooler_output,
            model.get_image_features(pixel_values=pixels).pooler_output,
            rtol=0,
            atol=0,
        )


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"part": "language", "drop_last": 3}, "drop_last=3 would drop all 3 layers of part 'language'"),
        ({"part": "language", "keep": 3}, "keep=3 drops nothing"),
        ({"part": "language", "layers": [0, 1, 2]}, r"layers=\[0, 1, 2\] would drop all 3 layers"),
        ({"part": "language", "layers": [1, 3]}, r"layers \[3\] are out of range for part 'language'.*0\.\.2"),
        ({"part": "bridge", "drop_last": 1}, "the model has no 'bridge' layers"),
    ],
)
def test_impossible_selections_are_refused_before_anything_changes(step, message) -> None:
    loaded = load_model("tiny:blip")
    before = n_params(loaded.model)
    with pytest.raises(ValueError, match=message):
        apply_variant(loaded.model, loaded.parts(), [{"method": "prune_layers", **step}])
    assert n_params(loaded.model) == before


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"part": "bridge"}, "exactly one of drop_last, keep, layers; got none"),
        ({"part": "bridge", "drop_last": 1, "keep": 2}, r"exactly one of .* got \['drop_last', 'keep'\]"),
        ({"part": "bridge", "drop_last": 0}, "drop_last must be a positive integer"),
        ({"part": "bridge", "keep": True}, "keep must be a positive integer"),
        ({"part": "bridge", "layers": []}, "layers must be a non-empty list"),
        ({"part": "bridge", "layers": [-1]}, "layers must be non-negative integers"),
        ({"part": "bridge", "layers": [1, 1]}, "lists an index twice"),
        ({"part": "all", "drop_last": 1}, "part must be one of vision, bridge, language"),
        ({"part": ["vision", "bridge"], "drop_last": 1}, "part must be one of"),
        ({"part": "bridge", "drop_last": 1, "role": "mlp"}, "role does not apply"),
        ({"part": "bridge", "drop_last": 1, "position": "last"}, "position does not apply"),
        ({"part": "bridge", "drop_last": 1, "modules": ["qformer.layernorm"]}, "modules does not apply"),
        ({"part": "bridge", "drop_first": 1}, "unknown setting.*'drop_first'"),
    ],
)
def test_bad_settings_name_the_setting(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        PruneLayersConfig.from_dict(settings)


def test_settings_round_trip() -> None:
    config = PruneLayersConfig.from_dict({"part": "bridge", "layers": [4, 2]})
    assert config.to_dict() == {
        "method": "prune_layers",
        "part": "bridge",
        "position": "all",
        "role": "both",
        "modules": [],
        "drop_last": None,
        "keep": None,
        "layers": [4, 2],
    }
    assert config.dropped(6) == [2, 4]
    assert PruneLayersConfig(part="bridge", keep=8).dropped(12) == [8, 9, 10, 11]  # the RSICD study's Q8
    assert PruneLayersConfig(part="language", drop_last=4).dropped(32) == [28, 29, 30, 31]  # LLM28
