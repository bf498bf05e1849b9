"""Qwen2.5-VL family: tiny build, parts and selection, encoding, learning, reload, batching, compression."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig

from tests.models.conftest import caption_batch, train_on_batch
from vlmopt.compress import METHODS, LowRankLinear, apply_variant
from vlmopt.compress.select import NothingSelectedError, select_modules
from vlmopt.data.images import open_image
from vlmopt.models import load_model
from vlmopt.models.qwen2_5_vl import IM_END, IMAGE_PAD, VISION_END, VISION_START, Qwen25VLAdapter

ADAPTER = Qwen25VLAdapter()
# Module names inside one layer, in the transformers source (models/qwen2_5_vl/modeling_qwen2_5_vl.py): the
# vision block (Qwen2_5_VLVisionBlock) has a fused qkv and a gated MLP with biases, the decoder layer
# (Qwen2_5_VLDecoderLayer) separate q/k/v/o (grouped-query) and a gated MLP.
VISION_ATTENTION = ("attn.qkv", "attn.proj")
VISION_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TEXT_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
TEXT_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
VISION = "model.visual.blocks"
LANGUAGE = "model.language_model.layers"
MERGER = ("model.visual.merger.mlp.0", "model.visual.merger.mlp.2")
GREEDY = {"max_new_tokens": 8, "num_beams": 1, "do_sample": False}
TRAIN_STEPS = 60


@pytest.fixture(scope="module")
def tiny(shapes_texts):
    return ADAPTER.tiny(shapes_texts, seed=0)


@pytest.fixture(scope="module")
def test_images(shapes_root, shapes_test):
    return [open_image(shapes_root, rel) for rel in shapes_test["image"][:8]]


@pytest.fixture(scope="module")
def trained(shapes_texts, shapes_root, shapes_train):
    """Tiny model after ``TRAIN_STEPS`` AdamW steps on a fixed batch of 16 captions: loaded, losses, grads, batch."""
    loaded = ADAPTER.tiny(shapes_texts, seed=0)
    encoded = caption_batch(loaded, shapes_root, shapes_train)
    losses, grads = train_on_batch(loaded, encoded, steps=TRAIN_STEPS, lr=3e-3)
    return loaded, losses, grads, encoded


def _generate(loaded, images, prompts, **kwargs):
    encoded = loaded.adapter.encode(loaded, images, prompts)
    return loaded.adapter.generate(loaded, encoded, **{**GREEDY, **kwargs})


def _tokens_per_image(config, side: int = 64) -> int:
    """Language-model tokens of a square image of ``side`` pixels: its patches, merged in squares."""
    vision = config.vision_config
    return (side // vision.patch_size) ** 2 // vision.spatial_merge_size**2


def test_tiny_model_size_config_and_parts(tiny):
    config, tok = tiny.model.config, tiny.tokenizer
    vision, text = config.vision_config, config.text_config
    assert isinstance(vision, Qwen2_5_VLVisionConfig) and isinstance(text, Qwen2_5_VLTextConfig)
    assert config.model_type == "qwen2_5_vl" and tiny.family == "qwen2_5_vl" == ADAPTER.name
    assert 50_000 < sum(p.numel() for p in tiny.model.parameters()) < 500_000
    # Windowed vision blocks and one full-attention block; windows of 2 x 2 merged tokens.
    assert vision.depth == 3 and list(vision.fullatt_block_indexes) == [2]
    assert vision.window_size // vision.spatial_merge_size // vision.patch_size == 2
    assert vision.out_hidden_size == text.hidden_size
    # M-RoPE: the three sections share the head's rotary frequency pairs; GQA with fewer key/value heads.
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert text.num_key_value_heads < text.num_attention_heads
    # The chat and vision tokens are single special tokens of the tokenizer, with the config's ids.
    ids = {t: tok.convert_tokens_to_ids(t) for t in (IMAGE_PAD, VISION_START, VISION_END, IM_END)}
    assert (config.image_token_id, config.vision_start_token_id, config.vision_end_token_id) == (
        ids[IMAGE_PAD],
        ids[VISION_START],
        ids[VISION_END],
    )
    assert text.eos_token_id == ids[IM_END] == tok.eos_token_id and text.pad_token_id == tok.pad_token_id
    assert len({*ids.values(), tok.pad_token_id, tok.unk_token_id}) == 6
    assert text.vocab_size == len(tok)
    assert tok.tokenize(ADAPTER.prompt("captioning")) == [
        "<|im_start|>",
        "system",
        "you",
        "are",
        "a",
        "helpful",
        "assistant",
        ".",
        "<|im_end|>",
        "<|im_start|>",
        "user",
        "<|vision_start|>",
        "<|image_pad|>",
        "<|vision_end|>",
        "describe",
        "this",
        "image",
        ".",
        "<|im_end|>",
        "<|im_start|>",
        "assistant",
    ]
    assert tok.unk_token not in tok.tokenize(ADAPTER.prompt("vqa", "what color is the shape?"))

    parts = tiny.parts()
    assert set(parts) == {"vision", "bridge", "language"} and parts["bridge"] == []
    assert len(parts["vision"]) == vision.depth and len(parts["language"]) == text.num_hidden_layers == 3
    for prefix, part in ((VISION, "vision"), (LANGUAGE, "language")):
        for i, (name, module) in enumerate(parts[part]):
            assert name == f"{prefix}.{i}"
            assert tiny.model.get_submodule(name) is module
    assert type(parts["vision"][0][1]).__name__ == "Qwen2_5_VLVisionBlock"
    assert type(parts["language"][0][1]).__name__ == "Qwen2_5_VLDecoderLayer"


def test_selection_by_part_and_role(tiny):
    model, parts, config = tiny.model, tiny.parts(), tiny.model.config
    n_text, n_vision = config.text_config.num_hidden_layers, config.vision_config.depth

    def names(**kwargs):
        return sorted(ref.name for ref in select_modules(model, parts, **kwargs))

    def expected(prefix, n, locals_):
        return sorted(f"{prefix}.{i}.{local}" for i in range(n) for local in locals_)

    assert names(part="vision", role="attention") == expected(VISION, n_vision, VISION_ATTENTION)
    assert names(part="vision", role="mlp") == expected(VISION, n_vision, VISION_MLP)
    assert names(part="language", role="attention") == expected(LANGUAGE, n_text, TEXT_ATTENTION)
    assert names(part="language", role="mlp") == expected(LANGUAGE, n_text, TEXT_MLP)
    assert len(names(part="all")) == n_vision * 5 + n_text * 7
    # No cross-attention anywhere: image tokens sit in the decoder's own sequence.
    with pytest.raises(NothingSelectedError):
        select_modules(model, parts, part="all", role="cross_attention")
    with pytest.raises(NothingSelectedError):
        select_modules(model, parts, part="bridge")
    # Shapes from the config: one fused q|k|v, and key/value projections of the key/value heads only.
    hidden, text = config.vision_config.hidden_size, config.text_config
    assert model.get_submodule(f"{VISION}.0.attn.qkv").out_features == 3 * hidden
    head_dim = text.hidden_size // text.num_attention_heads
    assert model.get_submodule(f"{LANGUAGE}.0.self_attn.k_proj").out_features == text.num_key_value_heads * head_dim
    # The merger and the LM head are outside every layer: reachable by name only, as part "other".
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears - set(names(part="all")) == {*MERGER, "lm_head"}
    refs = select_modules(model, parts, part="language", position="last", modules=["re:model\\.visual\\.merger\\..*"])
    assert [(r.name, r.part) for r in refs if "merger" in r.name] == [(m, "other") for m in MERGER]
    # Thirds of 3 layers: the last third is the top layer alone.
    assert names(part="language", position="last", role="mlp") == sorted(f"{LANGUAGE}.2.{m}" for m in TEXT_MLP)


def test_encode_expands_the_image_and_masks_the_prompt(tiny, test_images, shapes_test):
    tok, config = tiny.tokenizer, tiny.model.config
    question = shapes_test["question"][0]
    prompt = ADAPTER.prompt("vqa", question)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert f"{VISION_START}{IMAGE_PAD}{VISION_END}{question}\n" in prompt
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    caption = "two red circles on the left"
    enc = ADAPTER.encode(tiny, test_images[:2], [prompt, ADAPTER.prompt("captioning")], ["red", caption])
    ids, labels, mask = enc.inputs["input_ids"], enc.inputs["labels"], enc.inputs["attention_mask"]
    n_image = _tokens_per_image(config)
    assert n_image == 16
    for row in ids:
        at = (row == config.image_token_id).nonzero().flatten()
        # One contiguous run of image tokens between <|vision_start|> and <|vision_end|>.
        assert len(at) == n_image and at[-1] - at[0] == n_image - 1
        assert row[at[0] - 1] == config.vision_start_token_id and row[at[-1] + 1] == config.vision_end_token_id
    # The patches of both images, concatenated, with one (t, h, w) grid per image.
    vision = config.vision_config
    grid = 64 // vision.patch_size
    assert enc.inputs["image_grid_thw"].tolist() == [[1, grid, grid]] * 2
    width = 3 * vision.temporal_patch_size * vision.patch_size**2
    assert enc.inputs["pixel_values"].shape == (2 * grid * grid, width)
    assert torch.equal(enc.inputs["mm_token_type_ids"], (ids == config.image_token_id).int())
    # Only the answer and <|im_end|> are learned; the prompt and the padding are not.
    assert tok.convert_ids_to_tokens(ids[0][labels[0] != -100].tolist()) == ["red", IM_END]
    assert tok.convert_ids_to_tokens(ids[1][labels[1] != -100].tolist()) == [*caption.split(), IM_END]
    # prompt_length is the first row's prompt (the other row's captioning prompt is shorter).
    assert enc.prompt_length == len(tok.tokenize(prompt)) - 1 + n_image
    assert (labels[0, : enc.prompt_length] == -100).all()
    assert (labels[mask == 0] == -100).all() and (mask == 0).any() and (ids[mask == 0] == tok.pad_token_id).all()

    # Generation inputs are padded on the left, so that every answer starts at prompt_length.
    short = ADAPTER.prompt("vqa", "what shape?")
    gen = ADAPTER.encode(tiny, test_images[:2], [prompt, short])
    ids, mask = gen.inputs["input_ids"], gen.inputs["attention_mask"]
    n_short = len(tok.tokenize(short)) - 1 + n_image
    assert gen.prompt_length == ids.shape[1] == len(tok.tokenize(prompt)) - 1 + n_image
    assert mask[1].tolist() == [0] * (ids.shape[1] - n_short) + [1] * n_short
    assert tok.convert_ids_to_tokens(ids[:, -1].tolist()) == ["assistant", "assistant"]
    assert "labels" not in gen.inputs and (gen.inputs["mm_token_type_ids"][mask == 0] == 0).all()
    # Without mm_token_type_ids the image tokens would get 1-D text positions: the logits change.
    with torch.no_grad():
        full = tiny.model(**gen.inputs).logits
        flat = tiny.model(**{k: v for k, v in gen.inputs.items() if k != "mm_token_type_ids"}).logits
    assert not torch.allclose(full, flat, atol=1e-4)

    with pytest.raises(ValueError, match="depends on each image's size"):
        ADAPTER.encode(tiny, None, [prompt])
    with pytest.raises(ValueError, match="exactly one <\\|image_pad\\|>"):
        ADAPTER.encode(tiny, test_images[:1], ["a prompt without an image"])
    text_only = ADAPTER.encode(tiny, None, ["what color is the shape?"])
    assert "pixel_values" not in text_only.inputs and not text_only.inputs["mm_token_type_ids"].any()


def test_image_inputs_follow_each_image_size(tiny, test_images):
    images = [test_images[0], test_images[1].resize((64, 32)), test_images[2].resize((48, 80))]
    out = ADAPTER.image_inputs(tiny, images, [ADAPTER.prompt("captioning")] * 3)
    grids = out["image_grid_thw"].tolist()
    # Sides are rounded to multiples of patch * merge (16 px) within the pixel budget of 64 x 64.
    assert grids[0] == [1, 8, 8] and grids[1] == [1, 4, 8]
    assert grids[2][1] * grids[2][2] * 64 <= 64 * 64 and grids[2][1] > grids[2][2]
    assert out["pixel_values"].shape[0] == sum(t * h * w for t, h, w in grids)
    assert out["pixel_values"].dtype == tiny.model.dtype


def test_training_lowers_the_loss_and_uses_the_image(trained):
    loaded, losses, grads, batch = trained
    assert all(torch.isfinite(torch.tensor(losses)))
    n_vision = loaded.model.config.vision_config.depth
    for name in (
        "model.visual.patch_embed.proj.weight",
        f"{VISION}.0.attn.qkv.weight",
        f"{VISION}.{n_vision - 1}.mlp.down_proj.weight",
        "model.visual.merger.mlp.0.weight",
        f"{LANGUAGE}.0.self_attn.q_proj.weight",
        "lm_head.weight",
    ):
        assert grads[name] is not None and torch.isfinite(grads[name]).all() and grads[name].abs().sum() > 0, name
    with torch.no_grad():
        own = float(loaded.model(**batch.inputs).loss)
        per_image = batch.inputs["pixel_values"].shape[0] // batch.inputs["image_grid_thw"].shape[0]
        shuffled = dict(batch.inputs, pixel_values=batch.inputs["pixel_values"].roll(per_image, dims=0))
        other = float(loaded.model(**shuffled).loss)
    print(f"qwen2_5_vl tiny: loss {losses[0]:.3f} -> {own:.3f} in {TRAIN_STEPS} steps; shuffled images {other:.3f}")
    assert own < 0.4 * losses[0]
    # The captions depend on the image: someone else's image makes them much less likely.
    assert own < 0.7 * other


def test_save_and_reload_give_identical_generations(trained, test_images, shapes_test, tmp_path):
    loaded = trained[0]
    folder = loaded.save(tmp_path / "qwen")
    assert json.loads((folder / "vlmopt.json").read_text())["family"] == "qwen2_5_vl"
    assert (folder / "preprocessor_config.json").is_file() and (folder / "tokenizer.json").is_file()
    again = Qwen25VLAdapter().from_pretrained(str(folder))
    (folder / "vlmopt.json").unlink()
    # A folder as the hub serves it is recognised from its config's model_type.
    hub_like = load_model(folder)
    assert hub_like.family == again.family == "qwen2_5_vl"
    for (k, a), b in zip(loaded.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert again.tokenizer.get_vocab() == loaded.tokenizer.get_vocab()
    assert again.tokenizer.eos_token == IM_END and again.tokenizer.pad_token_id == loaded.tokenizer.pad_token_id
    before, after = loaded.processor.image_processor, again.processor.image_processor
    assert (after.patch_size, after.merge_size, after.temporal_patch_size) == (
        before.patch_size,
        before.merge_size,
        before.temporal_patch_size,
    )
    assert (after.size.shortest_edge, after.size.longest_edge) == (before.size.shortest_edge, before.size.longest_edge)
    images = test_images[:4]
    for prompt in (ADAPTER.prompt("captioning"), ADAPTER.prompt("vqa", shapes_test["question"][0])):
        first = _generate(loaded, images, [prompt] * 4)
        assert first == _generate(again, images, [prompt] * 4) == _generate(hub_like, images, [prompt] * 4)
        # New text only: no echo of the prompt, no special tokens, at most 8 words.
        assert all(0 < len(text.split()) <= 8 for text in first), first
        assert not any("assistant" in text or "<|" in text for text in first)
    # The trained model looks at the image: not one caption for every image.
    assert len(set(_generate(loaded, test_images, [ADAPTER.prompt("captioning")] * 8))) > 1


def test_batch_of_8_matches_batch_of_1_and_a_step_by_step_forward(trained, test_images, shapes_test):
    loaded = trained[0]
    tok = loaded.tokenizer
    caption = ADAPTER.prompt("captioning")
    assert _generate(loaded, test_images, [caption] * 8) == [
        _generate(loaded, [im], [caption])[0] for im in test_images
    ]
    # Questions of different lengths and images of different sizes: prompts of different lengths in one batch.
    questions = list(shapes_test["question"][:8])
    prompts = [ADAPTER.prompt("vqa", q) for q in questions]
    images = [im.resize((64, 32)) if i % 3 == 1 else im for i, im in enumerate(test_images)]
    lengths = {
        len(ADAPTER.encode(loaded, [im], [p]).inputs["input_ids"][0]) for im, p in zip(images, prompts, strict=True)
    }
    assert len(lengths) > 1 and len({len(tok.tokenize(p)) for p in prompts}) > 1
    batched = _generate(loaded, images, prompts)
    assert batched == [_generate(loaded, [im], [p])[0] for im, p in zip(images, prompts, strict=True)]
    mixed = [im.resize((48, 80)) if i % 2 else im for i, im in enumerate(test_images)]
    assert _generate(loaded, mixed, [caption] * 8) == [_generate(loaded, [im], [caption])[0] for im in mixed]

    # Cached generate() continues the M-RoPE positions after the image as a full forward does.
    encoded = ADAPTER.encode(loaded, images, prompts)
    end = tok.convert_tokens_to_ids(IM_END)
    out = loaded.model.generate(**encoded.inputs, **GREEDY, eos_token_id=end, pad_token_id=tok.pad_token_id)
    inputs = dict(encoded.inputs)
    with torch.no_grad():
        for _ in range(GREEDY["max_new_tokens"]):
            logits = loaded.model(**inputs, use_cache=False).logits
            step = logits[:, -1].argmax(-1, keepdim=True)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], step], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(step)], dim=1)
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(step)], dim=1)
    ids = inputs["input_ids"]
    # generate() pads a row after its end token; do the same to the step-by-step ids.
    for row in ids:
        ends = (row[encoded.prompt_length :] == end).nonzero()
        if len(ends):
            row[encoded.prompt_length + int(ends[0]) + 1 :] = tok.pad_token_id
    assert out.shape[1] > encoded.prompt_length + 1
    assert torch.equal(out, ids[:, : out.shape[1]])


def _variants(dataset: str) -> dict[str, list[dict]]:
    """One variant per compression method, each touching the vision tower or the language model or both."""
    calibration = {"dataset": dataset, "split": "train", "n": 8, "batch_size": 4}
    return {
        "uniform": [{"method": "uniform", "bits": 4, "part": "all"}],
        "dynamic_int8": [{"method": "dynamic_int8", "part": "all"}],
        "gptq": [{"method": "gptq", "bits": 4, "group_size": 16, "part": "all", "calibration": calibration}],
        "awq": [{"method": "awq", "bits": 4, "group_size": 16, "part": "language", "calibration": calibration}],
        "svd": [{"method": "svd", "ratio": 0.5, "part": "language", "role": "mlp"}],
        "prune_layers": [{"method": "prune_layers", "part": "language", "drop_last": 1}],
        "prune_heads": [{"method": "prune_heads", "part": "all", "heads": 1}],
        "lora": [
            {
                "method": "lora",
                "part": "language",
                "r": 4,
                "merge": False,
                "dataset": dataset,
                "training": {"max_steps": 4, "batch_size": 4, "lr": 1.0e-2},
            }
        ],
        "precision": [{"method": "precision", "dtype": "bfloat16"}],
    }


def _logits(loaded, batch) -> torch.Tensor:
    dtype = next(loaded.model.parameters()).dtype
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    with torch.no_grad():
        return loaded.model(**inputs).logits.float()


@pytest.fixture(scope="module")
def source(tmp_path_factory, shapes_texts):
    folder = tmp_path_factory.mktemp("qwen2_5_vl")
    ADAPTER.tiny(shapes_texts, seed=0).save(folder)
    return folder


@pytest.fixture(scope="module")
def calibration_batch(source, shapes_test, shapes_root):
    from vlmopt.tasks.encode import calibration_batches

    batches, _ = calibration_batches(load_model(source), shapes_test, shapes_root, n_samples=4, batch_size=4)
    return batches[0]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_compression_method_changes_saves_and_reloads(method, source, calibration_batch, shapes_root, tmp_path):
    from vlmopt.compress.saved import load_variant
    from vlmopt.pipeline import compress_loaded

    dense = _logits(load_model(source), calibration_batch)
    loaded = load_model(source)
    steps = _variants(shapes_root.name)[method]
    manifest = compress_loaded(loaded, tmp_path / method, steps=steps, data_root=shapes_root.parent, source=source)
    assert manifest["methods"] == [method] and manifest["steps"][0]["n_modules"] > 0
    evaluated = _logits(loaded, calibration_batch)
    assert torch.isfinite(evaluated).all()
    assert not torch.allclose(evaluated, dense, atol=1e-4), "the variant computes what the dense model does"
    torch.testing.assert_close(_logits(load_variant(tmp_path / method), calibration_batch), evaluated)


def test_every_method_has_a_variant(shapes_root):
    assert set(_variants(shapes_root.name)) == set(METHODS)


@pytest.mark.parametrize(
    "steps",
    [
        [{"method": "uniform", "bits": 4, "part": "vision"}],
        [{"method": "svd", "ratio": 0.5, "part": "language", "role": "mlp"}],
        [{"method": "prune_layers", "part": "language", "drop_last": 1}],
    ],
    ids=["uniform-vision", "svd", "prune_layers"],
)
def test_compression_variants_change_only_their_part(steps, shapes_texts, test_images, tmp_path):
    loaded = ADAPTER.tiny(shapes_texts, seed=0)
    model, method, part = loaded.model, steps[0]["method"], steps[0]["part"]
    encoded = ADAPTER.encode(loaded, test_images[:2], [ADAPTER.prompt("captioning")] * 2)
    with torch.no_grad():
        dense = model(**encoded.inputs).logits
    other = model.model.language_model if part == "vision" else model.model.visual
    untouched = {k: v.clone() for k, v in other.state_dict().items()}
    n_text, n_vision = model.config.text_config.num_hidden_layers, model.config.vision_config.depth
    manifest = apply_variant(model, loaded.parts(), steps)
    assert manifest["methods"] == [method]
    with torch.no_grad():
        after = model(**encoded.inputs).logits
    assert torch.isfinite(after).all() and not torch.allclose(after, dense, atol=1e-4)
    for k, v in other.state_dict().items():
        assert torch.equal(v, untouched[k]), k
    if method == "uniform":
        assert manifest["steps"][0]["n_modules"] == n_vision * (len(VISION_ATTENTION) + len(VISION_MLP))
        qkv = model.get_submodule(f"{VISION}.0.attn.qkv").weight
        # 4 bits per output row of the fused q|k|v: at most 16 distinct values in each.
        assert max(len(torch.unique(row)) for row in qkv) <= 16
    if method == "svd":
        for i in range(n_text):
            for local in TEXT_MLP:
                assert isinstance(model.get_submodule(f"{LANGUAGE}.{i}.{local}"), LowRankLinear)
            assert type(model.get_submodule(f"{LANGUAGE}.{i}.self_attn.q_proj")) is nn.Linear
    if method == "prune_layers":
        assert len(loaded.parts()["language"]) == n_text - 1 == model.config.text_config.num_hidden_layers
        assert [layer.self_attn.layer_idx for layer in model.model.language_model.layers] == list(range(n_text - 1))
        assert model.config.text_config.layer_types == ["full_attention"] * (n_text - 1)
        expected = _generate(loaded, test_images[:3], [ADAPTER.prompt("captioning")] * 3)
        folder = loaded.save(tmp_path / "pruned")
        again = ADAPTER.from_pretrained(str(folder))
        assert len(again.parts()["language"]) == n_text - 1 == again.model.config.text_config.num_hidden_layers
        assert sum(p.numel() for p in again.model.parameters()) == sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            torch.testing.assert_close(again.model(**encoded.inputs).logits, after)
        assert _generate(again, test_images[:3], [ADAPTER.prompt("captioning")] * 3) == expected


@pytest.mark.parametrize("part", ["vision", "language"])
def test_prune_heads_removes_one_head_per_block(part, shapes_texts, test_images):
    loaded = ADAPTER.tiny(shapes_texts, seed=0)
    config = loaded.model.config
    encoded = ADAPTER.encode(loaded, test_images[:2], [ADAPTER.prompt("captioning")] * 2)
    before = sum(p.numel() for p in loaded.model.parameters())
    apply_variant(loaded.model, loaded.parts(), [{"method": "prune_heads", "part": part, "heads": 1}])
    assert sum(p.numel() for p in loaded.model.parameters()) < before
    if part == "vision":
        heads = config.vision_config.num_heads
        assert all(block.attn.num_heads == heads - 1 for block in loaded.model.model.visual.blocks)
    with torch.no_grad():
        assert torch.isfinite(loaded.model(**encoded.inputs).logits).all()


def test_dropping_a_vision_block_keeps_full_attention_where_it_was(shapes_texts):
    loaded = ADAPTER.tiny(shapes_texts, seed=0)
    full = loaded.model.model.visual.blocks[2]
    apply_variant(loaded.model, loaded.parts(), [{"method": "prune_layers", "part": "vision", "layers": [0]}])
    visual = loaded.model.model.visual
    assert visual.blocks[1] is full and loaded.model.config.vision_config.depth == 2
    assert list(visual.fullatt_block_indexes) == [1] == list(loaded.model.config.vision_config.fullatt_block_indexes)
