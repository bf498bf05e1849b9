"""Layer pruning: exact parameter savings, config kept in step, identical outputs after save and reload."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import Blip2Config, Blip2ForConditionalGeneration

from vlmopt.compress import LowRankLinear, PruneLayersConfig, apply_variant, restore_structure
from vlmopt.compress.prune_layers import final_name
from vlmopt.compress.saved import load_variant
from vlmopt.models import get_family, load_model
from vlmopt.pipeline import compress_loaded

SUB_CONFIG = {
    ("blip", "vision"): "vision_config",
    ("blip", "language"): "text_config",
    ("blip2-opt", "vision"): "vision_config",
    ("blip2-opt", "bridge"): "qformer_config",
    ("blip2-opt", "language"): "text_config",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# T5-style stacks: a part over several layer lists, and the first block's relative position bias.
#: Per family: each layer list of the language part, and the self-attention in a block that holds
#: the stack's relative_attention_bias in its first block (modeling_t5.py, modeling_pix2struct.py).
STACKS = {
    "blip2-t5": (("language_model.encoder.block", "language_model.decoder.block"), "layer.0.SelfAttention"),
    "pix2struct": (("decoder.layer",), "self_attention.attention"),
}


def t5_counts(loaded) -> tuple[int, int]:
    text = loaded.model.config.text_config
    return text.num_layers, text.num_decoder_layers


def by_hand(loaded, drops: dict[str, list[int]], *, move_bias: bool = True):
    """A copy of ``loaded`` with blocks deleted from each layer list by hand (``drops``: list path -> indices).

    With ``move_bias``, a dropped first block's relative position bias table is handed to the
    self-attention of the first block that stays, as the stack's forward expects it there.
    """
    _, attention = STACKS[loaded.family]
    reference = copy.copy(loaded)
    reference.model = copy.deepcopy(loaded.model)
    for path, indices in drops.items():
        blocks = reference.model.get_submodule(path)
        kept = [i for i in range(len(blocks)) if i not in indices]
        if move_bias and 0 in indices:
            old = blocks[0].get_submodule(attention)
            new = blocks[kept[0]].get_submodule(attention)
            new.relative_attention_bias = old.relative_attention_bias
            new.has_relative_attention_bias = True
        for i in sorted(indices, reverse=True):
            del blocks[i]
        for i, block in enumerate(blocks):  # the KV-cache slot of each block that stays
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = i
    return reference


def test_t5_indices_over_encoder_and_decoder_are_split_per_stack() -> None:
    loaded = load_model("tiny:blip2-t5")
    n_enc, n_dec = t5_counts(loaded)
    encoder, decoder = STACKS["blip2-t5"][0]
    inputs = model_inputs(loaded)
    # Encoder block 1 and decoder block 1, as indices into the part's list (encoder blocks first).
    layers = [1, n_enc + 1]
    reference = by_hand(loaded, {encoder: [1], decoder: [1]})
    dropped_params = n_params(loaded.model) - n_params(reference.model)
    before = n_params(loaded.model)

    manifest = apply_variant(
        loaded.model, loaded.parts(), [{"method": "prune_layers", "part": "language", "layers": layers}]
    )
    assert n_params(loaded.model) == before - dropped_params
    assert torch.equal(logits(loaded, inputs), logits(reference, inputs))
    assert generate(loaded) == generate(reference)
    lm = loaded.model.language_model
    assert t5_counts(loaded) == (n_enc - 1, n_dec - 1)
    # Each T5Stack builds its blocks and its decoder KV cache from its own copy of the config.
    assert (lm.encoder.config.num_layers, lm.decoder.config.num_layers) == (n_enc - 1, n_dec - 1)
    assert [b.layer[0].SelfAttention.layer_idx for b in lm.decoder.block] == list(range(n_dec - 1))
    assert [b.layer[1].EncDecAttention.layer_idx for b in lm.decoder.block] == list(range(n_dec - 1))

    step = manifest["steps"][0]
    structure = step["structure"]
    assert structure["dropped_layers"] == layers
    assert structure["dropped_names"] == [f"{encoder}.1", f"{decoder}.1"]
    assert (structure["layers_before"], structure["layers_after"]) == (n_enc + n_dec, n_enc + n_dec - 2)
    assert structure["layer_lists"] == [
        {
            "layer_list": encoder,
            "dropped_layers": [1],
            "layers_before": n_enc,
            "layers_after": n_enc - 1,
            "config_key": "text_config.num_layers",
        },
        {
            "layer_list": decoder,
            "dropped_layers": [1],
            "layers_before": n_dec,
            "layers_after": n_dec - 1,
            "config_key": "text_config.num_decoder_layers",
        },
    ]
    assert "layer_list" not in structure  # the flat key of one-list steps would name only one of them
    assert {m["layer_index"] for m in step["modules"]} == set(layers)
    assert {m["name"].rsplit(".", 4)[0] for m in step["modules"]} == {f"{encoder}.1", f"{decoder}.1"}


@pytest.mark.parametrize(
    ("family", "layers"),
    [("blip2-t5", lambda n_enc: [0, n_enc]), ("pix2struct", lambda n_enc: [0])],
    ids=["blip2-t5", "pix2struct"],
)
def test_dropping_a_first_block_moves_its_relative_position_bias(family, layers) -> None:
    loaded = load_model(f"tiny:{family}")
    lists, attention = STACKS[family]
    n_enc = len(loaded.model.get_submodule(lists[0]))  # the first list: the encoder for T5
    dropped = layers(n_enc)
    inputs = model_inputs(loaded)
    tables = [loaded.model.get_submodule(f"{path}.0.{attention}").relative_attention_bias.weight for path in lists]
    reference = by_hand(loaded, {path: [0] for path in lists})
    without_bias = by_hand(loaded, {path: [0] for path in lists}, move_bias=False)

    manifest = apply_variant(
        loaded.model, loaded.parts(), [{"method": "prune_layers", "part": "language", "layers": dropped}]
    )
    pruned = logits(loaded, inputs)
    assert torch.equal(pruned, logits(reference, inputs))
    # The bias is not a detail: without it every position looks alike to the blocks that stay.
    assert not torch.allclose(pruned, logits(without_bias, inputs), atol=1e-4)
    assert generate(loaded) == generate(reference)
    for path, table in zip(lists, tables, strict=True):
        first = loaded.model.get_submodule(f"{path}.0.{attention}")
        assert first.has_relative_attention_bias and first.relative_attention_bias.weight is table
    entries = manifest["steps"][0]["structure"]["layer_lists"]
    assert [e["moved_bias"] for e in entries] == [
        [{"path": f"{attention}.relative_attention_bias", "from_layer": 0, "to_layer": 1}]
    ] * len(lists)


@pytest.mark.parametrize("family", ["blip2-t5", "pix2struct"])
def test_pruned_t5_stacks_reload_from_the_manifest(family, tmp_path) -> None:
    """SVD first, then drop every stack's first block: the factors reload under the blocks' new names."""
    loaded = load_model(f"tiny:{family}")
    lists, attention = STACKS[family]
    sizes = [len(loaded.model.get_submodule(path)) for path in lists]
    starts = [sum(sizes[:i]) for i in range(len(lists))]  # each stack's first block in the part's list
    inputs = model_inputs(loaded)
    steps = [
        {"method": "svd", "ratio": 0.5, "part": "language", "role": "mlp"},
        {"method": "prune_layers", "part": "language", "layers": starts},
    ]
    manifest = compress_loaded(loaded, tmp_path / "v", steps=steps)
    expected, text = logits(loaded, inputs), generate(loaded)
    written = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert [e["layer_list"] for e in written["steps"][1]["structure"]["layer_lists"]] == list(lists)
    assert written["parameters"]["model"]["total"] == n_params(loaded.model) == manifest["parameters"]["model"]["total"]

    again = load_variant(tmp_path / "v")
    assert torch.equal(logits(again, inputs), expected)
    assert generate(again) == text
    # The MLPs that stay were factorized in block 1 and sit in block 0 now, in every stack.
    factorized = sorted(n for n, m in again.model.named_modules() if isinstance(m, LowRankLinear))
    assert factorized == sorted(n for n, m in loaded.model.named_modules() if isinstance(m, LowRankLinear))
    blocks = {
        f"{path}.{n.removeprefix(path + '.').split('.')[0]}" for n in factorized for path in lists if n.startswith(path)
    }
    assert blocks == {f"{path}.{i}" for path, size in zip(lists, sizes, strict=True) for i in range(size - 1)}
    for path in lists:
        first = again.model.get_submodule(f"{path}.0.{attention}")
        assert first.has_relative_attention_bias
        assert torch.equal(
            first.relative_attention_bias.weight,
            loaded.model.get_submodule(f"{path}.0.{attention}").relative_attention_bias.weight,
        )
    assert again.model.state_dict().keys() == loaded.model.state_dict().keys()


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (lambda e, d: {"drop_last": d}, r"drop every layer of language_model\.decoder\.block .*keep at least one"),
        (lambda e, d: {"layers": list(range(e))}, r"drop every layer of language_model\.encoder\.block"),
        (lambda e, d: {"layers": list(range(e, e + d))}, r"drop every layer of language_model\.decoder\.block"),
        (lambda e, d: {"layers": [e - 1]}, r"1 encoder and 2 decoder blocks.*cannot generate"),
    ],
    ids=["drop_last-decoder", "all-encoder", "all-decoder", "decoder-above-encoder"],
)
def test_t5_selection_that_empties_a_stack_or_cannot_generate_is_refused(step, message) -> None:
    loaded = load_model("tiny:blip2-t5")
    n_enc, n_dec = t5_counts(loaded)
    assert (n_enc, n_dec) == (2, 2)  # the messages above name these counts
    before = copy.deepcopy(loaded.model.state_dict())
    with pytest.raises(ValueError, match=message):
        apply_variant(
            loaded.model, loaded.parts(), [{"method": "prune_layers", "part": "language", **step(n_enc, n_dec)}]
        )
    # Refused before anything changed.
    assert t5_counts(loaded) == (n_enc, n_dec)
    assert (len(loaded.model.language_model.encoder.block), len(loaded.model.language_model.decoder.block)) == (2, 2)
    after = loaded.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("family", ["blip2-t5", "pix2struct"])
def test_head_pruned_first_blocks_hand_on_the_full_bias_and_reload(family, tmp_path) -> None:
    """Heads pruned everywhere, then the first blocks dropped: the moved table still serves every head."""
    loaded = load_model(f"tiny:{family}")
    lists, attention = STACKS[family]
    sizes = [len(loaded.model.get_submodule(path)) for path in lists]
    heads = loaded.model.get_submodule(f"{lists[0]}.0.{attention}").n_heads
    steps = [
        {"method": "prune_heads", "part": "language", "heads": 1},
        {"method": "prune_layers", "part": "language", "layers": [sum(sizes[:i]) for i in range(len(lists))]},
    ]
    inputs = model_inputs(loaded)
    compress_loaded(loaded, tmp_path / "v", steps=steps)
    for path in lists:
        first = loaded.model.get_submodule(f"{path}.0.{attention}")
        assert first.has_relative_attention_bias and first.n_heads == heads - 1
        assert first.relative_attention_bias.weight.shape[1] == heads  # one column per original head
    expected = logits(loaded, inputs)
    assert torch.isfinite(expected).all()
    assert torch.equal(logits(load_variant(tmp_path / "v"), inputs), expected)


def test_names_follow_both_the_flat_and_the_per_list_structure() -> None:
    # Written before a step could span several lists: one flat layer_list.
    flat = {"method": "prune_layers", "structure": {"layer_list": "lm.layers", "dropped_layers": [0, 2]}}
    assert final_name("lm.layers.3.fc1", [flat]) == "lm.layers.1.fc1"
    assert final_name("lm.layers.1", [flat]) == "lm.layers.0"
    assert final_name("lm.layers.2.fc1", [flat]) is None
    assert final_name("lm.layers_norm.weight", [flat]) == "lm.layers_norm.weight"
    lists = {
        "method": "prune_layers",
        "structure": {
            "layer_lists": [
                {"layer_list": "t5.encoder.block", "dropped_layers": [1]},
                {"layer_list": "t5.decoder.block", "dropped_layers": [0]},
            ]
        },
    }
    assert (
        final_name("t5.encoder.block.2.layer.0.SelfAttention.q", [lists])
        == "t5.encoder.block.1.layer.0.SelfAttention.q"
    )
    assert (
        final_name("t5.encoder.block.0.layer.1.DenseReluDense.wo", [lists])
        == "t5.encoder.block.0.layer.1.DenseReluDense.wo"
    )
    assert (
        final_name("t5.decoder.block.1.layer.2.DenseReluDense.wo", [lists])
        == "t5.decoder.block.0.layer.2.DenseReluDense.wo"
    )
    assert final_name("t5.decoder.block.0.layer.2.DenseReluDense.wo", [lists]) is None
    assert final_name("t5.encoder.block.1.layer.0.SelfAttention.q", [lists]) is None
    # Two steps in a row: the second counts in the numbering the first left.
    assert (
        final_name("t5.decoder.block.2.layer.0.SelfAttention.o", [lists, lists])
        == "t5.decoder.block.0.layer.0.SelfAttention.o"
    )
    assert final_name("t5.encoder.block.2.x", [{"method": "svd", "structure": {}}, lists]) == "t5.encoder.block.1.x"
