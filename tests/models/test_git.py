"""GIT family: tiny build, parts and selection, encoding, learning, reload, batching, compression."""

from __future__ import annotations

import pytest
import torch
from transformers import GitConfig, GitVisionConfig

from tests.models.conftest import caption_batch, train_on_batch
from vlmopt.compress import LowRankLinear, apply_variant, restore_structure
from vlmopt.compress.select import NothingSelectedError, select_modules
from vlmopt.data.images import open_image
from vlmopt.models.git import GitAdapter

ADAPTER = GitAdapter()
# Module names inside one layer, in the transformers source (models/git/modeling_git.py): the text
# decoder is BERT-style (GitLayer), the image encoder CLIP-style (GitVisionEncoderLayer).
TEXT_ATTENTION = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
TEXT_MLP = ("intermediate.dense", "output.dense")
VISION_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
VISION_MLP = ("mlp.fc1", "mlp.fc2")
LANGUAGE = "git.encoder.layer"
VISION = "git.image_encoder.vision_model.encoder.layers"


@pytest.fixture(scope="module")
def tiny(shapes_texts):
    return ADAPTER.tiny(shapes_texts, seed=0)


@pytest.fixture(scope="module")
def test_images(shapes_root, shapes_test):
    return [open_image(shapes_root, rel) for rel in shapes_test["image"][:8]]


@pytest.fixture(scope="module")
def trained(shapes_texts, shapes_root, shapes_train):
    """A tiny model after 40 AdamW steps on one fixed batch of 16 captions, its losses and first gradients."""
    loaded = ADAPTER.tiny(shapes_texts, seed=0)
    encoded = caption_batch(loaded, shapes_root, shapes_train)
    losses, grads = train_on_batch(loaded, encoded, steps=40, lr=3e-3)
    with torch.no_grad():
        final = float(loaded.model(**encoded.inputs).loss)
    return loaded, losses, final, grads


def _generate(loaded, images, prompts, max_new_tokens=8):
    encoded = loaded.adapter.encode(loaded, images, prompts)
    return loaded.adapter.generate(loaded, encoded, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)


def _image_tokens(config: GitConfig) -> int:
    """Patches plus the class token of the CLIP image encoder."""
    return (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1


def test_tiny_model_size_parts_and_special_ids(tiny):
    config = tiny.model.config
    assert isinstance(config, GitConfig) and isinstance(config.vision_config, GitVisionConfig)
    assert config.model_type == "git" and tiny.family == "git" == ADAPTER.name
    n_params = sum(p.numel() for p in tiny.model.parameters())
    assert 50_000 < n_params < 300_000
    # GIT's [CLS] / [SEP] / [PAD] are the tokenizer's cls / sep / pad tokens.
    tok = tiny.tokenizer
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.cls_token_id,
        tok.sep_token_id,
        tok.pad_token_id,
    )
    assert len(set((config.bos_token_id, config.eos_token_id, config.pad_token_id))) == 3
    assert config.vocab_size == len(tok)

    parts = tiny.parts()
    assert set(parts) == {"vision", "bridge", "language"}
    assert parts["bridge"] == []
    assert len(parts["vision"]) == config.vision_config.num_hidden_layers == 3
    assert len(parts["language"]) == config.num_hidden_layers == 3
    for prefix, part in ((VISION, "vision"), (LANGUAGE, "language")):
        for i, (name, module) in enumerate(parts[part]):
            assert name == f"{prefix}.{i}"
            assert tiny.model.get_submodule(name) is module


def test_selection_by_part_and_role(tiny):
    model, parts, config = tiny.model, tiny.parts(), tiny.model.config
    n_text, n_vision = config.num_hidden_layers, config.vision_config.num_hidden_layers

    def names(**kwargs):
        return [ref.name for ref in select_modules(model, parts, **kwargs)]

    def expected(prefix, n, locals_):
        return {f"{prefix}.{i}.{local}" for i in range(n) for local in locals_}

    attention = names(part="language", role="attention")
    assert len(attention) == n_text * 4 and set(attention) == expected(LANGUAGE, n_text, TEXT_ATTENTION)
    mlp = names(part="language", role="mlp")
    assert len(mlp) == n_text * 2 and set(mlp) == expected(LANGUAGE, n_text, TEXT_MLP)
    # GIT's decoder has no separate cross-attention: text attends to the image inside self-attention.
    assert set(names(part="language", role="self_attention")) == set(attention)
    with pytest.raises(NothingSelectedError):
        select_modules(model, parts, part="language", role="cross_attention")

    assert set(names(part="vision", role="attention")) == expected(VISION, n_vision, VISION_ATTENTION)
    assert set(names(part="vision", role="mlp")) == expected(VISION, n_vision, VISION_MLP)
    last = names(part="language", position="last")
    assert set(last) == expected(LANGUAGE, n_text, TEXT_ATTENTION + TEXT_MLP) - expected(
        LANGUAGE, 2 * n_text // 3, TEXT_ATTENTION + TEXT_MLP
    )
    # No bridge layers, and the visual projection and LM head are reached only by name.
    with pytest.raises(NothingSelectedError):
        select_modules(model, parts, part="bridge")
    everything = names(part="all")
    assert len(everything) == n_text * 6 + n_vision * 6
    assert "git.visual_projection.visual_projection.0" not in everything and "output" not in everything
    named = names(part="language", role="mlp", modules=["git.visual_projection.visual_projection.0"])
    assert named[-1] == "git.visual_projection.visual_projection.0"


def test_encode_prompt_and_labels(tiny, test_images):
    tok = tiny.tokenizer
    config = tiny.model.config
    question = "what color is the shape?"
    prompt = ADAPTER.prompt("vqa", question)
    assert prompt == question and ADAPTER.prompt("captioning") == ""
    enc = ADAPTER.encode(tiny, test_images[:2], [prompt, ""], ["red", "two red circles on the left"])
    ids, labels, mask = enc.inputs["input_ids"], enc.inputs["labels"], enc.inputs["attention_mask"]
    # [CLS] question answer [SEP]: only the answer and [SEP] are learned; padding is masked out.
    assert ids[0, 0] == ids[1, 0] == config.bos_token_id
    assert tok.convert_ids_to_tokens(ids[0][mask[0] == 1].tolist()) == [
        "<s>",
        *tok.tokenize(question),
        "red",
        "</s>",
    ]
    assert tok.convert_ids_to_tokens(ids[0][labels[0] != -100].tolist()) == ["red", "</s>"]
    assert tok.decode(ids[1][labels[1] != -100], skip_special_tokens=True) == "two red circles on the left"
    assert (labels[mask == 0] == -100).all() and (ids[mask == 0] == tok.pad_token_id).all()
    assert enc.inputs["pixel_values"].shape == (2, 3, 64, 64)
    # Generation starts after [CLS] + the question.
    gen = ADAPTER.encode(tiny, test_images[:1], [prompt])
    assert gen.prompt_length == 1 + len(tok.tokenize(question)) == gen.inputs["input_ids"].shape[1]
    assert "labels" not in gen.inputs
    # The image enters as patch tokens in front of the text, not as placeholder ids.
    with torch.no_grad():
        logits = tiny.model(**enc.inputs).logits
    assert logits.shape[1] == _image_tokens(config) + ids.shape[1]


def test_training_lowers_the_loss_with_gradients_everywhere(trained):
    loaded, losses, final, grads = trained
    assert all(torch.isfinite(torch.tensor(losses)))
    print(f"git tiny training loss {losses[0]:.3f} -> {final:.3f}")
    # The image path gets gradient: vision encoder, projection and text decoder.
    for name in (
        "git.image_encoder.vision_model.embeddings.patch_embedding.weight",
        f"{VISION}.0.self_attn.q_proj.weight",
        "git.visual_projection.visual_projection.0.weight",
        f"{LANGUAGE}.0.attention.self.query.weight",
        "output.weight",
    ):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert final < 0.4 * losses[0]


def test_save_reload_gives_identical_generations(tiny, test_images, shapes_test, tmp_path):
    folder = tiny.save(tmp_path / "m")
    again = GitAdapter().from_pretrained(str(folder))
    assert again.family == "git"
    a, b = again.model.config, tiny.model.config
    assert (a.bos_token_id, a.eos_token_id, a.pad_token_id, a.num_hidden_layers) == (
        b.bos_token_id,
        b.eos_token_id,
        b.pad_token_id,
        b.num_hidden_layers,
    )
    assert _image_tokens(a) == _image_tokens(b) and a.vision_config.hidden_size == b.vision_config.hidden_size
    assert again.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    for (k, a), b in zip(tiny.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    images = test_images[:3]
    question = shapes_test["question"][0]
    for prompt in (ADAPTER.prompt("captioning"), ADAPTER.prompt("vqa", question)):
        before = _generate(tiny, images, [prompt] * 3)
        assert before == _generate(again, images, [prompt] * 3)
        # Only new text, no echo of the question: at most 8 words each.
        assert all(len(tiny.tokenizer.tokenize(t)) <= 8 for t in before)


def test_batch_of_8_matches_batch_of_1_and_a_step_by_step_forward(trained, test_images):
    loaded = trained[0]
    prompts = [ADAPTER.prompt("captioning"), ADAPTER.prompt("vqa", "what color is the shape?")]
    for prompt in prompts:
        batched = _generate(loaded, test_images, [prompt] * 8)
        single = [_generate(loaded, [im], [prompt])[0] for im in test_images]
        assert batched == single
    # The trained model looks at the image: not one caption for every image.
    assert len(set(_generate(loaded, test_images, [prompts[0]] * 8))) > 1

    # Cached generate() numbers text positions from 0, as training does; compare with a full forward per token.
    # (transformers 5 keeps the image tokens in the KV cache, and a cached forward without position_ids
    # would number the next text token after them.)
    config = loaded.model.config
    encoded = ADAPTER.encode(loaded, test_images, [prompts[0]] * 8)
    out = loaded.model.generate(**encoded.inputs, max_new_tokens=8, do_sample=False, num_beams=1)
    ids = encoded.inputs["input_ids"]
    with torch.no_grad():
        for _ in range(8):
            logits = loaded.model(input_ids=ids, pixel_values=encoded.inputs["pixel_values"]).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    # generate() pads a row after its [SEP]; do the same to the step-by-step ids.
    for row in ids:
        ends = (row[encoded.prompt_length :] == config.eos_token_id).nonzero()
        if len(ends):
            row[encoded.prompt_length + int(ends[0]) + 1 :] = config.pad_token_id
    assert out.shape[1] > encoded.prompt_length + 1
    assert torch.equal(out, ids[:, : out.shape[1]])


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
    vision_before = {k: v.clone() for k, v in model.git.image_encoder.state_dict().items()}
    n_text = model.config.num_hidden_layers
    manifest = apply_variant(model, loaded.parts(), steps)
    assert manifest["methods"] == [method]
    with torch.no_grad():
        after = model(**encoded.inputs).logits
    assert torch.isfinite(after).all() and not torch.allclose(after, dense, atol=1e-4)
    for k, v in model.git.image_encoder.state_dict().items():
        assert torch.equal(v, vision_before[k]), k
    if method == "uniform":
        assert manifest["steps"][0]["n_modules"] == n_text * (len(TEXT_ATTENTION) + len(TEXT_MLP))
        weight = model.get_submodule(f"{LANGUAGE}.0.attention.self.query").weight
        # 4 bits: at most 16 distinct values per row of a 48-wide weight.
        assert max(len(torch.unique(row)) for row in weight) <= 16
    if method == "svd":
        for i in range(n_text):
            for local in TEXT_MLP:
                assert isinstance(model.get_submodule(f"{LANGUAGE}.{i}.{local}"), LowRankLinear)
            assert type(model.get_submodule(f"{LANGUAGE}.{i}.attention.self.query")) is torch.nn.Linear
        # The factors reload into a fresh model under the same names.
        folder = loaded.save(tmp_path / "svd")
        again = ADAPTER.from_pretrained(str(folder))
        restore_structure(again.model, manifest, folder)
        with torch.no_grad():
            torch.testing.assert_close(again.model(**encoded.inputs).logits, after)
    if method == "prune_layers":
        assert len(loaded.parts()["language"]) == n_text - 1 == model.config.num_hidden_layers
        assert [layer.attention.self.layer_idx for layer in model.git.encoder.layer] == list(range(n_text - 1))
        expected = _generate(loaded, test_images[:3], [ADAPTER.prompt("captioning")] * 3)
        folder = loaded.save(tmp_path / "pruned")
        again = ADAPTER.from_pretrained(str(folder))
        assert len(again.parts()["language"]) == n_text - 1 == again.model.config.num_hidden_layers
        assert sum(p.numel() for p in again.model.parameters()) == sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            torch.testing.assert_close(again.model(**encoded.inputs).logits, after)
        assert _generate(again, test_images[:3], [ADAPTER.prompt("captioning")] * 3) == expected
