"""LLaVA-1.5 family: tiny build, parts and selection, encoding, learning, reload, batching, compression."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig

from tests.models.conftest import caption_batch, train_on_batch
from vlmopt.compress import LowRankLinear, apply_variant
from vlmopt.compress.select import select_modules
from vlmopt.data.images import open_image
from vlmopt.models.llava import LlavaAdapter

ADAPTER = LlavaAdapter()
# Module names inside one layer, in the transformers source (modeling_llama.py, modeling_clip.py).
LLAMA_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
CLIP_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
CLIP_MLP = ("mlp.fc1", "mlp.fc2")
LANGUAGE = "model.language_model.layers"
VISION = "model.vision_tower.encoder.layers"


@pytest.fixture(scope="module")
def tiny(shapes_texts):
    return ADAPTER.tiny(shapes_texts, seed=0)


@pytest.fixture(scope="module")
def test_images(shapes_root, shapes_test):
    return [open_image(shapes_root, rel) for rel in shapes_test["image"][:8]]


@pytest.fixture(scope="module")
def trained(shapes_texts, shapes_root, shapes_train):
    """A tiny model after 40 AdamW steps on one fixed batch of 16 captions, and its losses."""
    loaded = ADAPTER.tiny(shapes_texts, seed=0)
    encoded = caption_batch(loaded, shapes_root, shapes_train)
    losses, grads = train_on_batch(loaded, encoded, steps=40, lr=3e-3)
    with torch.no_grad():
        final = float(loaded.model(**encoded.inputs).loss)
    return loaded, losses, final, grads


def _generate(loaded, images, prompts, max_new_tokens=8):
    encoded = loaded.adapter.encode(loaded, images, prompts)
    return loaded.adapter.generate(loaded, encoded, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)


def test_tiny_model_size_parts_and_image_tokens(tiny):
    config = tiny.model.config
    assert isinstance(config.vision_config, CLIPVisionConfig) and isinstance(config.text_config, LlamaConfig)
    assert config.model_type == "llava" and tiny.family == "llava" == ADAPTER.name
    n_params = sum(p.numel() for p in tiny.model.parameters())
    assert 50_000 < n_params < 300_000
    # One <image> token per 8x8 patch of the 64x64 image; the "default" strategy drops CLS.
    assert config.vision_feature_select_strategy == "default"
    assert config.image_seq_length == (64 // 8) ** 2 == 64
    parts = tiny.parts()
    assert set(parts) == {"vision", "bridge", "language"}
    assert parts["bridge"] == []
    assert len(parts["vision"]) == config.vision_config.num_hidden_layers == 3
    assert len(parts["language"]) == config.text_config.num_hidden_layers == 3
    for prefix, part in ((VISION, "vision"), (LANGUAGE, "language")):
        for i, (name, module) in enumerate(parts[part]):
            assert name == f"{prefix}.{i}"
            assert tiny.model.get_submodule(name) is module
    assert type(parts["vision"][0][1]).__name__ == "CLIPEncoderLayer"
    assert type(parts["language"][0][1]).__name__ == "LlamaDecoderLayer"


def test_selection_by_part_and_role(tiny):
    model, parts = tiny.model, tiny.parts()
    n_text, n_vision = model.config.text_config.num_hidden_layers, model.config.vision_config.num_hidden_layers

    def names(**kwargs):
        return sorted(ref.name for ref in select_modules(model, parts, **kwargs))

    def expected(prefix, n, locals_):
        return sorted(f"{prefix}.{i}.{local}" for i in range(n) for local in locals_)

    assert names(part="language", role="attention") == expected(LANGUAGE, n_text, LLAMA_ATTENTION)
    assert names(part="language", role="mlp") == expected(LANGUAGE, n_text, LLAMA_MLP)
    assert names(part="vision", role="attention") == expected(VISION, n_vision, CLIP_ATTENTION)
    assert names(part="vision", role="mlp") == expected(VISION, n_vision, CLIP_MLP)
    assert len(names(part="language", role="attention")) == 4 * n_text
    # The projector and the LM head are never selected by part; the projector is reachable by name.
    everything = names(part="all")
    assert not [n for n in everything if "multi_modal_projector" in n or n == "lm_head"]
    refs = select_modules(model, parts, part="language", position="last", modules=["re:.*multi_modal_projector.*"])
    projector = [r for r in refs if "multi_modal_projector" in r.name]
    assert [(r.name, r.part) for r in projector] == [
        ("model.multi_modal_projector.linear_1", "other"),
        ("model.multi_modal_projector.linear_2", "other"),
    ]


def test_encode_expands_the_image_token_and_masks_the_prompt(tiny, test_images, shapes_test):
    tok, config = tiny.tokenizer, tiny.model.config
    question = shapes_test["question"][0]
    prompt = ADAPTER.prompt("vqa", question)
    assert prompt.startswith("USER: <image>\n") and prompt.endswith(" ASSISTANT:") and question in prompt
    enc = ADAPTER.encode(tiny, test_images[:2], [prompt, prompt], ["red", "two red circles on the left"])
    ids, labels, mask = enc.inputs["input_ids"], enc.inputs["labels"], enc.inputs["attention_mask"]
    assert ((ids == config.image_token_index).sum(dim=1) == config.image_seq_length).all()
    # The processor's own expansion (patch size, CLS, strategy) gives the same prompt ids; it also
    # appends </s>, which generation must not see.
    own = tiny.processor(images=test_images[:1], text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
    assert own[-1] == tok.eos_token_id
    assert ids[0, : enc.prompt_length].tolist() == own[:-1]
    assert ids[0, 0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[0][labels[0] != -100].tolist()) == ["red", "</s>"]
    assert tok.convert_ids_to_tokens(ids[1][labels[1] != -100].tolist()) == "two red circles on the left </s>".split()
    assert (labels[:, : enc.prompt_length] == -100).all()
    assert (labels[mask == 0] == -100).all() and (mask[0] == 0).any()
    assert enc.inputs["pixel_values"].shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="exactly one <image>"):
        ADAPTER.encode(tiny, None, ["USER: no image here ASSISTANT:"])


def test_training_lowers_the_loss(trained):
    loaded, losses, final, grads = trained
    assert all(torch.isfinite(torch.tensor(losses)))
    # Every part upstream of the loss gets a gradient: vision layers up to vision_feature_layer
    # (-2: all but the last), the projector and the language model.
    n_vision = loaded.model.config.vision_config.num_hidden_layers
    used = n_vision + 1 + loaded.model.config.vision_feature_layer  # hidden_states[-2] is after layer n-2
    for name in (
        f"{VISION}.0.self_attn.q_proj.weight",
        f"{VISION}.{used - 1}.mlp.fc2.weight",
        "model.multi_modal_projector.linear_1.weight",
        f"{LANGUAGE}.0.self_attn.q_proj.weight",
        "lm_head.weight",
    ):
        assert grads[name] is not None and torch.isfinite(grads[name]).all() and grads[name].abs().sum() > 0, name
    assert grads[f"{VISION}.{n_vision - 1}.mlp.fc2.weight"] is None
    assert final < 0.5 * losses[0], (losses[0], final)


def test_save_and_reload_gives_identical_generation(trained, test_images, shapes_test, tmp_path):
    loaded = trained[0]
    folder = loaded.save(tmp_path / "llava")
    assert json.loads((folder / "vlmopt.json").read_text())["family"] == "llava"
    again = LlavaAdapter().from_pretrained(str(folder))
    for (k, a), b in zip(loaded.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    images = test_images[:4]
    for prompt in (ADAPTER.prompt("captioning"), ADAPTER.prompt("vqa", shapes_test["question"][0])):
        first, second = _generate(loaded, images, [prompt] * 4), _generate(again, images, [prompt] * 4)
        assert first == second
        assert all(0 < len(text.split()) <= 8 for text in first), first
        assert not any("assistant" in text for text in first)


def test_batch_of_one_and_of_eight_generate_the_same(trained, test_images, shapes_test):
    loaded = trained[0]
    for prompt in (ADAPTER.prompt("captioning"), ADAPTER.prompt("vqa", shapes_test["question"][0])):
        together = _generate(loaded, test_images, [prompt] * 8)
        alone = [_generate(loaded, [image], [prompt])[0] for image in test_images]
        assert together == alone


@pytest.mark.parametrize(
    "steps",
    [
        [{"method": "uniform", "bits": 4, "part": "language"}],
        [{"method": "svd", "ratio": 0.5, "part": "language", "role": "mlp"}],
        [{"method": "prune_layers", "part": "language", "drop_last": 1}],
    ],
    ids=["uniform", "svd", "prune_layers"],
)
def test_compression_variants(steps, shapes_texts, test_images, tmp_path):
    loaded = ADAPTER.tiny(shapes_texts, seed=0)
    model, method = loaded.model, steps[0]["method"]
    encoded = ADAPTER.encode(loaded, test_images[:2], [ADAPTER.prompt("captioning")] * 2)
    with torch.no_grad():
        dense = model(**encoded.inputs).logits
    vision_before = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    n_text = model.config.text_config.num_hidden_layers
    manifest = apply_variant(model, loaded.parts(), steps)
    assert manifest["methods"] == [method]
    with torch.no_grad():
        after = model(**encoded.inputs).logits
    assert torch.isfinite(after).all() and not torch.allclose(after, dense, atol=1e-4)
    # Only the language part changed.
    for k, v in model.model.vision_tower.state_dict().items():
        assert torch.equal(v, vision_before[k]), k
    if method == "uniform":
        weight = model.get_submodule(f"{LANGUAGE}.0.self_attn.q_proj").weight
        assert manifest["steps"][0]["n_modules"] == n_text * (len(LLAMA_ATTENTION) + len(LLAMA_MLP))
        # 4 bits: at most 16 distinct values per row of a 48-wide weight.
        assert max(len(torch.unique(row)) for row in weight) <= 16
    if method == "svd":
        for i in range(n_text):
            for local in LLAMA_MLP:
                assert isinstance(model.get_submodule(f"{LANGUAGE}.{i}.{local}"), LowRankLinear)
            assert isinstance(model.get_submodule(f"{LANGUAGE}.{i}.self_attn.q_proj"), torch.nn.Linear)
    if method == "prune_layers":
        assert len(loaded.parts()["language"]) == n_text - 1 == model.config.text_config.num_hidden_layers
        expected = _generate(loaded, test_images[:3], [ADAPTER.prompt("captioning")] * 3)
        folder = loaded.save(tmp_path / "pruned")
        again = ADAPTER.from_pretrained(str(folder))
        assert len(again.parts()["language"]) == n_text - 1
        assert again.model.config.text_config.num_hidden_layers == n_text - 1
        assert sum(p.numel() for p in again.model.parameters()) == sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            torch.testing.assert_close(again.model(**encoded.inputs).logits, after)
        assert _generate(again, test_images[:3], [ADAPTER.prompt("captioning")] * 3) == expected


def test_svd_factors_reload(shapes_texts, test_images, tmp_path):
    from vlmopt.compress import restore_structure

    loaded = ADAPTER.tiny(shapes_texts, seed=0)
    manifest = apply_variant(loaded.model, loaded.parts(), [{"method": "svd", "ratio": 0.5, "part": "language"}])
    encoded = ADAPTER.encode(loaded, test_images[:2], [ADAPTER.prompt("captioning")] * 2)
    folder = loaded.save(tmp_path / "svd")
    again = ADAPTER.from_pretrained(str(folder))
    restore_structure(again.model, manifest, folder)
    with torch.no_grad():
        torch.testing.assert_close(again.model(**encoded.inputs).logits, loaded.model(**encoded.inputs).logits)


def test_dropping_the_unused_last_vision_layer_keeps_the_output(shapes_texts, test_images):
    loaded = ADAPTER.tiny(shapes_texts, seed=0)
    encoded = ADAPTER.encode(loaded, test_images[:2], [ADAPTER.prompt("captioning")] * 2)
    with torch.no_grad():
        dense = loaded.model(**encoded.inputs).logits
    apply_variant(loaded.model, loaded.parts(), [{"method": "prune_layers", "part": "vision", "drop_last": 1}])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**encoded.inputs).logits, dense)
    assert loaded.model.config.vision_feature_layer == -1


def test_dropping_the_image_feature_layer_is_refused(shapes_texts):
    loaded = ADAPTER.tiny(shapes_texts, seed=0)
    n = loaded.model.config.vision_config.num_hidden_layers
    # vision_feature_layer=-2 is the output of layer n - 2.
    with pytest.raises(ValueError, match=f"vision layer {n - 2} is the image feature"):
        apply_variant(loaded.model, loaded.parts(), [{"method": "prune_layers", "part": "vision", "layers": [n - 2]}])
    # Dropping a layer below it keeps the same output, renumbered from the end.
    apply_variant(loaded.model, loaded.parts(), [{"method": "prune_layers", "part": "vision", "layers": [0]}])
    assert loaded.model.config.vision_feature_layer == -2
