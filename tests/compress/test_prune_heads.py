"""Attention-head pruning: exact equivalence with zeroed heads, exact savings, criterion, save and reload."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vlmopt.compress import (
    LowRankLinear,
    NothingSelectedError,
    PruneHeadsConfig,
    apply_variant,
    restore_pruned_heads,
    select_modules,
)
from vlmopt.compress.attention_blocks import attention_blocks
from vlmopt.compress.prune_heads import head_scores
from vlmopt.compress.saved import load_variant
from vlmopt.models import load_model
from vlmopt.pipeline import compress_model

OUT = {
    "opt": "out_proj",
    "vit_fused_qkv": "projection",
    "bert": "output.dense",
    "qformer": "output.dense",
    "llama": "o_proj",
    "qwen2": "o_proj",
    "qwen_vision": "proj",
    "persimmon": "dense",
    "t5": "o",
    "pix2struct_text": "output",
    "pix2struct_vision": "output",
}
OPT_LAYERS = "language_model.model.decoder.layers"
T5 = "language_model.encoder.block"
T5_DECODER = "language_model.decoder.block"
QWEN_TEXT = "model.language_model.layers"


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


def generate(loaded, **generate_kwargs) -> list[str]:
    rng = np.random.RandomState(1)
    images = [Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    prompt = loaded.adapter.prompt("captioning")
    encoded = loaded.adapter.encode(loaded, images, [prompt, prompt])
    return loaded.adapter.generate(loaded, encoded, max_new_tokens=6, num_beams=1, do_sample=False, **generate_kwargs)


def _attention_shape(config, family: str, part: str, role: str) -> tuple[int, int, int]:
    """(attention blocks, query heads, key-value heads) of a part's ``role`` blocks, as the config states them."""
    if family == "blip2-t5" and part == "language":  # T5: encoder and decoder stacks, cross-attention in the decoder
        text = config.text_config
        blocks = text.num_decoder_layers if role == "cross_attention" else text.num_layers + text.num_decoder_layers
        return blocks, text.num_heads, text.num_heads
    if part == "bridge":
        qformer = config.qformer_config
        layers = qformer.num_hidden_layers
        blocks = -(-layers // qformer.cross_attention_frequency) if role == "cross_attention" else layers
        return blocks, qformer.num_attention_heads, qformer.num_attention_heads
    sub = config.vision_config if part == "vision" else config.text_config
    layers = next(getattr(sub, k) for k in ("depth", "num_layers", "num_hidden_layers") if hasattr(sub, k))
    heads = next(getattr(sub, k) for k in ("num_heads", "num_attention_heads") if getattr(sub, k, None))
    return layers, heads, getattr(sub, "num_key_value_heads", None) or heads


@pytest.mark.parametrize(
    ("family", "part", "role", "layout"),
    [
        ("blip2-opt", "language", "attention", "opt"),
        ("blip", "vision", "attention", "vit_fused_qkv"),
        ("blip2-opt", "vision", "attention", "vit_fused_qkv"),
        ("blip2-opt", "bridge", "cross_attention", "qformer"),
        ("blip2-opt", "bridge", "self_attention", "qformer"),
        ("blip", "language", "cross_attention", "bert"),
        ("blip", "language", "self_attention", "bert"),
        ("llava", "vision", "attention", "opt"),  # CLIP's attention
        ("llava", "language", "attention", "llama"),
        ("qwen2_5_vl", "language", "attention", "qwen2"),  # grouped-query: 4 query heads, 2 key-value heads
        ("qwen2_5_vl", "vision", "attention", "qwen_vision"),
        ("fuyu", "language", "attention", "persimmon"),
        ("pix2struct", "vision", "attention", "pix2struct_vision"),
        ("pix2struct", "language", "self_attention", "pix2struct_text"),
        ("pix2struct", "language", "cross_attention", "pix2struct_text"),
        ("blip2-t5", "language", "self_attention", "t5"),
        ("blip2-t5", "language", "cross_attention", "t5"),
    ],
)
def test_pruned_model_equals_original_with_the_removed_heads_zeroed(family, part, role, layout) -> None:
    loaded = load_model(f"tiny:{family}")
    inputs = model_inputs(loaded)
    original = copy.deepcopy(loaded.model)
    full = logits(loaded, inputs)
    manifest = apply_variant(
        loaded.model, loaded.parts(), [{"method": "prune_heads", "part": part, "role": role, "heads": 1}]
    )
    pruned = logits(loaded, inputs)
    blocks = manifest["steps"][0]["structure"]["blocks"]
    n_blocks, heads, kv_heads = _attention_shape(loaded.model.config, family, part, role)
    group = heads // kv_heads  # heads=1 removes one head, or one key-value group with its query heads
    assert len(blocks) == n_blocks and {b["layout"] for b in blocks} == {layout}
    with torch.no_grad():
        for block in blocks:
            assert (block["heads_before"], block["heads_after"]) == (heads, heads - group)
            assert len(block["heads_removed"]) == group
            out = original.get_submodule(f"{block['block']}.{OUT[layout]}").weight
            d = block["head_dim"]
            for head in block["heads_removed"]:
                out[:, head * d : (head + 1) * d] = 0
        zeroed = original(**inputs).logits
    assert float((pruned - full).abs().max()) > 1e-4  # the removed heads mattered, well above the tolerance
    # The fused ViT path runs eager attention where BLIP-2's stock one runs SDPA: rounding only.
    torch.testing.assert_close(pruned, zeroed, rtol=1e-5, atol=1e-5)


def _removed_params(config, r: int, *, encoder_width: int | None = None) -> int:
    """Parameters that removing ``r`` heads takes from one block (q, k, v with biases; out without)."""
    width = config.hidden_size
    d = width // config.num_attention_heads
    kv_width = encoder_width or width
    return r * d * (width + 1) + 2 * r * d * (kv_width + 1) + width * r * d


@pytest.mark.parametrize(
    ("family", "part", "role", "sub_config", "cross", "by_hand"),
    [
        # 3 layers x (3 x 24 x (48 + 1) + 48 x 24): q, k, v rows with bias, out_proj columns.
        ("blip2-opt", "language", "attention", "text_config", False, 14040),
        # 3 layers x (3 x 16 x (32 + 1) + 32 x 16): three row blocks of the fused qkv.
        ("blip", "vision", "attention", "vision_config", False, 6288),
        # 3 layers x (24 x 49 + 2 x 24 x (32 + 1) + 48 x 24): keys and values read the 32-wide image.
        ("blip", "language", "cross_attention", "text_config", True, 11736),
        ("blip2-opt", "bridge", "cross_attention", "qformer_config", True, 6288),
    ],
)
def test_parameter_count_drops_by_exactly_the_removed_heads(family, part, role, sub_config, cross, by_hand) -> None:
    loaded = load_model(f"tiny:{family}")
    model = loaded.model
    config = getattr(model.config, sub_config)
    n_layers = len(loaded.parts()[part])
    expected = n_layers * _removed_params(config, 1, encoder_width=config.encoder_hidden_size if cross else None)
    assert expected == by_hand
    before = n_params(model)
    manifest = apply_variant(
        model, loaded.parts(), [{"method": "prune_heads", "part": part, "role": role, "fraction": 0.5}]
    )
    after = n_params(model)
    assert before - after == expected

    step = manifest["steps"][0]
    structure = step["structure"]
    assert (structure["params_before"], structure["params_after"]) == (before, after)
    assert structure["module_params_before"] - structure["module_params_after"] == expected
    assert (structure["heads_before"], structure["heads_after"]) == (2 * n_layers, n_layers)
    assert manifest["parameters"]["model"]["total"] == after and manifest["nominal_size_bytes"] == 4 * after
    assert manifest["representation"] == "real"
    d = config.hidden_size // config.num_attention_heads
    for record in step["modules"]:
        module = model.get_submodule(record["name"])
        assert isinstance(module, nn.Linear)
        assert (module.out_features, module.in_features) == (record["out_features_after"], record["in_features_after"])
        assert record["params_after"] == sum(p.numel() for p in module.parameters())
        if record["projection"] == "out":
            assert record["in_features_before"] - record["in_features_after"] == d
        else:
            removed_rows = (3 if record["projection"] == "qkv" else 1) * d
            assert record["out_features_before"] - record["out_features_after"] == removed_rows
            assert record["in_features_after"] == record["in_features_before"]
        assert len(record["head_scores"]) == 2 and len(record["heads_kept"]) == 1
        assert sorted(record["heads_kept"] + record["heads_removed"]) == [0, 1]
    assert {m["name"] for m in manifest["changed_modules"]} == {m["name"] for m in step["modules"]}


@pytest.mark.parametrize(
    ("family", "part", "role", "bias", "by_hand"),
    [
        # 3 layers x ((2 query + 1 key + 1 value) x 16 x (64 + 1) + o_proj (no bias) 64 x 2 x 16): one
        # key-value group (1 key-value head, 2 query heads) per layer.
        ("qwen2_5_vl", "language", "attention", True, 18624),
        # 3 layers x (3 x 16 x (32 + 1) rows of the fused qkv + 32 x 16 columns of proj).
        ("qwen2_5_vl", "vision", "attention", True, 6288),
        # 3 layers x (3 x 24 x (48 + 1) rows of query_key_value ([q_h; k_h; v_h]) + 48 x 24 columns of dense).
        ("fuyu", "language", "attention", True, 14040),
        # 4 blocks (2 encoder, 2 decoder) x (3 x 24 x 48 rows + 48 x 24 columns): T5 has no biases.
        ("blip2-t5", "language", "self_attention", False, 18432),
        # 3 layers x (3 x 24 x 48 + 48 x 24).
        ("pix2struct", "vision", "attention", False, 13824),
    ],
)
def test_parameter_count_drops_by_the_removed_rows_and_columns(family, part, role, bias, by_hand) -> None:
    loaded = load_model(f"tiny:{family}")
    config = loaded.model.config
    n_blocks, heads, kv_heads = _attention_shape(config, family, part, role)
    sub = config.vision_config if part == "vision" else config.text_config
    width = getattr(sub, "d_model", None) or sub.hidden_size
    d = getattr(sub, "d_kv", None) or width // heads
    group = heads // kv_heads
    # Query rows of the group's heads, one key and one value head's rows, the group's output columns.
    expected = n_blocks * ((group + 2) * d * (width + int(bias)) + width * group * d)
    assert expected == by_hand
    before = n_params(loaded.model)
    manifest = apply_variant(
        loaded.model, loaded.parts(), [{"method": "prune_heads", "part": part, "role": role, "heads": 1}]
    )
    assert before - n_params(loaded.model) == expected
    structure = manifest["steps"][0]["structure"]
    assert structure["module_params_before"] - structure["module_params_after"] == expected
    assert (structure["heads_before"], structure["heads_after"]) == (n_blocks * heads, n_blocks * (heads - group))


def test_grouped_query_attention_loses_whole_key_value_groups() -> None:
    loaded = load_model("tiny:qwen2_5_vl")
    model = loaded.model
    text = model.config.text_config
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    d, group = text.hidden_size // heads, heads // kv_heads
    assert (heads, kv_heads, group) == (4, 2, 2)
    with torch.no_grad():
        model.get_submodule(f"{QWEN_TEXT}.0.self_attn.v_proj").weight[d : 2 * d] *= 0.01  # group 1's value rows
        model.get_submodule(f"{QWEN_TEXT}.1.self_attn.o_proj").weight[:, : group * d] *= 0.01  # group 0's columns
    refs = select_modules(model, loaded.parts(), part="language", role="attention")
    blocks = attention_blocks(model, loaded.parts(), refs)
    assert [(b.num_heads, b.group_size, b.num_groups) for b in blocks] == [(heads, group, kv_heads)] * 3
    third = blocks[2]
    value = third.projection("value").weight.detach().double().reshape(kv_heads, d, -1)
    out = third.projection("out").weight.detach().double().reshape(-1, kv_heads, group, d)
    l2 = torch.stack([value[g].norm() * out[:, g].norm() for g in range(kv_heads)])
    ov = torch.stack([sum((out[:, g, j] @ value[g]).norm() ** 2 for j in range(group)).sqrt() for g in range(kv_heads)])
    torch.testing.assert_close(head_scores(third, "l2"), l2)
    torch.testing.assert_close(head_scores(third, "ov"), ov)
    assert bool((ov <= l2 * (1 + 1e-12)).all())

    for setting, message in [
        ({"heads": 2}, r"heads=2 would remove all 2 key-value groups of model\.language_model\.layers\.0\.self_attn"),
        ({"fraction": 0.25}, r"fraction=0\.25 removes no key-value group .* which has 2 key-value groups"),
    ]:
        with pytest.raises(ValueError, match=message):
            apply_variant(model, loaded.parts(), [{"method": "prune_heads", "part": "language", **setting}])
    manifest = apply_variant(model, loaded.parts(), [{"method": "prune_heads", "part": "language", "fraction": 0.5}])
    summary = manifest["steps"][0]["structure"]["blocks"]
    assert [b["kv_heads_removed"] for b in summary[:2]] == [[1], [0]]
    assert [b["heads_removed"] for b in summary[:2]] == [[2, 3], [0, 1]]
    assert summary[2]["kv_heads_removed"] == [int(torch.argmin(l2))]
    assert summary[2]["head_scores"] == pytest.approx(l2.tolist())
    for block in summary:
        assert (block["group_size"], block["kv_heads_before"], block["kv_heads_after"]) == (group, kv_heads, 1)
        attention = model.get_submodule(block["block"])
        assert (attention.num_heads, attention.num_key_value_heads, attention.num_key_value_groups) == (2, 1, group)
        shapes = [attention.q_proj.out_features, attention.k_proj.out_features, attention.v_proj.out_features]
        assert shapes == [group * d, d, d] and attention.o_proj.in_features == group * d


def test_each_layer_reads_the_shared_position_bias_of_the_heads_it_kept(tmp_path) -> None:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, dropout_rate=0.0)
    torch.manual_seed(0)
    model = T5EncoderModel(config).eval()
    layers = model.encoder.block
    d = config.d_kv
    with torch.no_grad():  # layer 0 loses original heads 0 then 2; layer 1 heads 3 then 1
        for layer, first, second in [(0, 0, 2), (1, 3, 1)]:
            value = layers[layer].layer[0].SelfAttention.v.weight
            value[first * d : (first + 1) * d] *= 1e-3
            value[second * d : (second + 1) * d] *= 1e-2
    original = copy.deepcopy(model)
    table = layers[0].layer[0].SelfAttention.relative_attention_bias.weight.detach().clone()
    ids = torch.randint(4, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    parts = {"language": [(f"encoder.block.{i}", layer) for i, layer in enumerate(layers)]}
    step = {"method": "prune_heads", "part": "language", "heads": 1}
    manifest = apply_variant(model, parts, [step, step])
    final = manifest["steps"][1]["structure"]["blocks"]
    assert [b["layout"] for b in final] == ["t5"] * 3
    assert [b["bias_heads"] for b in final[:2]] == [[1, 3], [0, 2]]
    assert {b["bias_width"] for b in final} == {4}
    # The table stays whole: layers 1 and 2 read its columns of heads that layer 0 dropped.
    assert torch.equal(layers[0].layer[0].SelfAttention.relative_attention_bias.weight, table)
    with torch.no_grad():
        for block in final:
            out = original.get_submodule(f"{block['block']}.o").weight
            for head in set(range(4)) - set(block["bias_heads"]):
                out[:, head * d : (head + 1) * d] = 0
        zeroed = original(input_ids=ids, attention_mask=mask).last_hidden_state
        pruned = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(pruned, zeroed, rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path / "t5")
    fresh = T5EncoderModel.from_pretrained(tmp_path / "t5", ignore_mismatched_sizes=True).eval()
    restore_pruned_heads(fresh, json.loads(json.dumps(manifest)), tmp_path / "t5")
    assert fresh.encoder.block[1].layer[0].SelfAttention.n_heads == 2
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).last_hidden_state, pruned)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "fuyu", "pix2struct", "blip2-t5"])
def test_every_layout_reloads_with_identical_logits_and_generation(family, tmp_path) -> None:
    source = load_model(f"tiny:{family}").save(tmp_path / "source")
    steps = [{"method": "prune_heads", "part": "all", "heads": 1}]
    if family == "llava":  # the pruned Llama projections of the last layer then get factorized
        steps.append({"method": "svd", "rank": 4, "part": "language", "position": "last", "role": "attention"})
    expected = load_model(source)
    in_memory = apply_variant(expected.model, expected.parts(), steps)
    inputs = model_inputs(expected)
    expected_logits = logits(expected, inputs)
    # Six new tokens, none of pad, bos, eos, unk, <image> (ids 0-4 of the word-level tokenizer): untrained
    # tiny models often end at once or emit only special tokens, which decode to nothing.
    words = {"min_new_tokens": 6, "suppress_tokens": [0, 1, 2, 3, 4]}
    expected_text = generate(expected, **words)
    assert all(text.strip() for text in expected_text)

    out = tmp_path / "variant"
    manifest = compress_model(source, out, steps=steps)
    assert json.loads(json.dumps(manifest)) == json.loads(json.dumps(in_memory))
    reloaded = load_variant(out)
    assert n_params(reloaded.model) == n_params(expected.model) == manifest["parameters"]["model"]["total"]
    assert torch.equal(logits(reloaded, inputs), expected_logits)
    assert generate(reloaded, **words) == expected_text
    assert (out / "model.safetensors").stat().st_size < (source / "model.safetensors").stat().st_size
    for block in manifest["steps"][0]["structure"]["blocks"]:
        module = reloaded.model.get_submodule(block["block"])
        if "bias_heads" in block:
            assert module.pruned_bias_heads == tuple(block["bias_heads"])
        if "kv_heads_after" in block:
            assert module.num_key_value_groups == block["group_size"]
            assert module.k_proj.out_features == block["kv_heads_after"] * block["head_dim"]
    if family == "llava":
        last = reloaded.model.get_submodule("model.language_model.layers.2.self_attn")
        assert isinstance(last.q_proj, LowRankLinear) and last.q_proj.out_features == last.head_dim


def test_attention_flops_drop_with_the_heads() -> None:
    loaded = load_model("tiny:blip2-opt")
    attention = loaded.model.get_submodule(f"{OPT_LAYERS}.0.self_attn")
    x = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(0))

    def linear_flops() -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            attention(x)
        counts = counter.get_flop_counts()["Global"]
        return sum(v for op, v in counts.items() if op in (torch.ops.aten.addmm, torch.ops.aten.mm))

    before = linear_flops()
    apply_variant(loaded.model, loaded.parts(), [{"method": "prune_heads", "part": "language", "heads": 1}])
    after = linear_flops()
    tokens = 2 * 7
    assert before == 2 * tokens * 4 * 48 * 48
    assert after == 2 * tokens * 4 * 48 * 24
    assert (attention.num_heads, attention.head_dim) == (1, 24)


def test_criterion_removes_the_lowest_importance_heads() -> None:
    loaded = load_model("tiny:blip2-opt")
    model = loaded.model
    with torch.no_grad():
        model.get_submodule(f"{OPT_LAYERS}.0.self_attn.v_proj").weight[:24] *= 0.01  # head 0's value rows
        model.get_submodule(f"{OPT_LAYERS}.1.self_attn.out_proj").weight[:, 24:] *= 0.01  # head 1's columns
        model.get_submodule("vision_model.encoder.layers.0.self_attn.qkv").weight[80:96] *= 0.01  # head 1's values
    refs = select_modules(model, loaded.parts(), part="language", role="attention")
    third = attention_blocks(model, loaded.parts(), refs)[2]
    value = third.projection("value").weight.detach().double().reshape(2, 24, 48)
    out = third.projection("out").weight.detach().double().reshape(48, 2, 24)
    l2 = torch.stack([value[h].norm() * out[:, h].norm() for h in range(2)])
    ov = torch.stack([(out[:, h] @ value[h]).norm() for h in range(2)])
    torch.testing.assert_close(head_scores(third, "l2"), l2)
    torch.testing.assert_close(head_scores(third, "ov"), ov)
    assert bool((ov <= l2 * (1 + 1e-12)).all())  # l2 bounds the value-output map's norm

    manifest = apply_variant(
        model,
        loaded.parts(),
        [
            {"method": "prune_heads", "part": "language", "heads": 1},
            {"method": "prune_heads", "part": "vision", "position": "first", "heads": 1, "criterion": "ov"},
        ],
    )
    language = manifest["steps"][0]["structure"]["blocks"]
    assert [b["heads_removed"] for b in language[:2]] == [[0], [1]]
    assert language[2]["heads_removed"] == [int(torch.argmin(l2))]
    assert language[2]["head_scores"] == pytest.approx(l2.tolist())
    vision = manifest["steps"][1]["structure"]
    assert vision["criterion"] == "ov" and vision["blocks"][0]["heads_removed"] == [1]


@pytest.mark.parametrize("family", ["blip2-opt", "blip"])
def test_generation_is_identical_after_compress_model_and_load_variant(family, tmp_path) -> None:
    source = load_model(f"tiny:{family}").save(tmp_path / "source")
    if family == "blip2-opt":
        steps = [
            {"method": "prune_heads", "part": "vision", "heads": 1},
            {"method": "prune_heads", "part": "bridge", "role": "cross_attention", "fraction": 0.5},
            {"method": "prune_heads", "part": "language", "position": ["first", "last"], "heads": 1},
            # The already shrunk projections of the last OPT layer get factorized ...
            {"method": "svd", "rank": 4, "part": "language", "position": "last", "role": "attention"},
            # ... and then renamed when layer 1 goes.
            {"method": "prune_layers", "part": "language", "layers": [1]},
        ]
    else:
        steps = [
            {"method": "prune_heads", "part": "language", "heads": 1},
            {"method": "prune_heads", "part": "vision", "fraction": 0.5, "criterion": "ov"},
            {"method": "uniform", "bits": 8, "part": "language", "role": "attention"},
        ]
    expected = load_model(source)
    in_memory = apply_variant(expected.model, expected.parts(), steps)
    inputs = model_inputs(expected)
    expected_logits = logits(expected, inputs)
    expected_text = generate(expected)

    out = tmp_path / "variant"
    manifest = compress_model(source, out, steps=steps)
    assert json.loads(json.dumps(manifest)) == json.loads(json.dumps(in_memory))
    reloaded = load_variant(out)
    assert n_params(reloaded.model) == n_params(expected.model) == manifest["parameters"]["model"]["total"]
    assert torch.equal(logits(reloaded, inputs), expected_logits)
    assert generate(reloaded) == expected_text
    assert (out / "model.safetensors").stat().st_size < (source / "model.safetensors").stat().st_size
    if family == "blip2-opt":
        last = reloaded.model.get_submodule(f"{OPT_LAYERS}.1.self_attn")
        assert last.num_heads == 1 and isinstance(last.q_proj, LowRankLinear) and last.q_proj.out_features == 24
        assert reloaded.model.get_submodule(f"{OPT_LAYERS}.0.self_attn").num_heads == 1
        cross = reloaded.model.get_submodule("qformer.encoder.layer.2.crossattention.attention")
        assert (cross.num_attention_heads, cross.all_head_size, cross.key.in_features) == (1, 16, 32)
        assert reloaded.model.get_submodule("qformer.encoder.layer.2.attention.attention").num_attention_heads == 2
    else:
        vision = reloaded.model.get_submodule("vision_model.encoder.layers.2.self_attn")
        assert (vision.num_heads, vision.qkv.out_features, vision.projection.in_features) == (1, 48, 16)


def test_pruning_heads_of_factorized_projections_is_refused() -> None:
    loaded = load_model("tiny:blip2-opt")
    steps = [
        {"method": "svd", "rank": 4, "part": "language", "position": "last", "role": "attention"},
        {"method": "prune_heads", "part": "language", "position": "last", "heads": 1},
    ]
    with pytest.raises(ValueError, match=r"step 1: prune_heads: .*self_attn\.\w+ is a LowRankLinear, not a Linear"):
        apply_variant(loaded.model, loaded.parts(), steps)


@pytest.mark.parametrize(
    ("family", "step", "error", "message"),
    [
        ("blip", {"part": "language", "heads": 2}, ValueError, r"heads=2 would remove all 2 heads of text_decoder"),
        ("blip", {"part": "vision", "fraction": 0.4}, ValueError, r"fraction=0\.4 removes no head .* has 2 heads"),
        ("blip", {"part": "bridge", "heads": 1}, NothingSelectedError, r"part='bridge'.*bridge: absent"),
        ("blip", {"part": "vision", "role": "cross_attention", "heads": 1}, NothingSelectedError, "cross_attention"),
    ],
)
def test_impossible_selections_are_refused_before_anything_changes(family, step, error, message) -> None:
    loaded = load_model(f"tiny:{family}")
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with pytest.raises(error, match=message):
        apply_variant(loaded.model, loaded.parts(), [{"method": "prune_heads", **step}])
    after = loaded.model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"part": "language"}, "exactly one of heads .* or fraction"),
        ({"part": "language", "heads": 1, "fraction": 0.5}, "exactly one of heads"),
        ({"part": "language", "heads": 0}, "heads must be a positive integer"),
        ({"part": "language", "heads": True}, "heads must be a positive integer"),
        ({"part": "language", "heads": 1.5}, "heads must be a positive integer"),
        ({"part": "language", "fraction": 0}, r"fraction must be a number with 0 < fraction < 1, got 0"),
        ({"part": "language", "fraction": 1}, r"0 < fraction < 1, got 1"),
        ({"part": "language", "fraction": 1.5}, r"0 < fraction < 1, got 1\.5"),
        ({"part": "language", "fraction": -0.25}, r"0 < fraction < 1"),
        ({"part": "language", "fraction": True}, r"0 < fraction < 1"),
        ({"part": "language", "heads": 1, "role": "mlp"}, "role='mlp' is not allowed: heads live in attention blocks"),
        ({"part": "language", "heads": 1, "role": ["attention", "both"]}, "role='both' is not allowed"),
        ({"part": "language", "heads": 1, "modules": ["lm_head"]}, "modules does not apply"),
        (
            {"part": "language", "heads": 1, "criterion": "random"},
            "criterion='random' is not allowed; choose one of l2, ov",
        ),
        ({"part": "language", "heads": 1, "head": 1}, "unknown setting.*'head'.*method 'prune_heads'"),
        ({"part": "everything", "heads": 1}, "part='everything' is not allowed"),
    ],
)
def test_bad_settings_name_the_setting(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        PruneHeadsConfig.from_dict(settings)


def test_settings_defaults_and_round_trip() -> None:
    config = PruneHeadsConfig.from_dict({"part": "bridge", "fraction": 0.5})
    assert config.to_dict() == {
        "method": "prune_heads",
        "part": "bridge",
        "position": "all",
        "role": "attention",
        "modules": [],
        "heads": None,
        "fraction": 0.5,
        "criterion": "l2",
    }
    assert config.removed_for(12, "block") == 6 and config.removed_for(3, "block") == 1
    assert PruneHeadsConfig(part="language", heads=3).removed_for(32, "block") == 3
