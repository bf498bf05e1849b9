"""The Pix2Struct family adapter on its tiny model: parts, selection, encoding, training, generation, compression."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn

from tests.models.conftest import caption_batch, train_on_batch
from vlmopt.compress import apply_variant
from vlmopt.compress.select import select_modules
from vlmopt.compress.svd import LowRankLinear
from vlmopt.data.images import open_image
from vlmopt.models.base import LoadedModel
from vlmopt.models.encoding import text_ids
from vlmopt.models.pix2struct import Pix2StructAdapter

GREEDY = {"max_new_tokens": 8, "num_beams": 1, "do_sample": False}
TRAIN_STEPS = 40


@pytest.fixture(scope="module")
def adapter() -> Pix2StructAdapter:
    return Pix2StructAdapter()


@pytest.fixture(scope="module")
def tiny(adapter, shapes_texts) -> LoadedModel:
    return adapter.tiny(shapes_texts, seed=0)


@pytest.fixture(scope="module")
def trained(adapter, shapes_texts, shapes_root, shapes_train):
    """A fresh tiny model after ``TRAIN_STEPS`` AdamW steps on 16 captions; (loaded, losses, batch)."""
    loaded = adapter.tiny(shapes_texts, seed=0)
    batch = caption_batch(loaded, shapes_root, shapes_train)
    losses, _ = train_on_batch(loaded, batch, steps=TRAIN_STEPS, lr=3e-3)
    return loaded, losses, batch


def _expected_linears(prefix: str, n_layers: int, blocks: dict[str, tuple[str, ...]]) -> list[str]:
    return [
        f"{prefix}.{i}.{block}.{proj}" for i in range(n_layers) for block, projs in blocks.items() for proj in projs
    ]


QKVO = ("query", "key", "value", "output")
GATED_MLP = ("wi_0", "wi_1", "wo")


def test_tiny_model_size_and_parts_follow_the_config(tiny):
    model, config = tiny.model, tiny.model.config
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 < n_params < 300_000
    parts = tiny.parts()
    assert set(parts) == {"vision", "bridge", "language"}
    assert len(parts["vision"]) == config.vision_config.num_hidden_layers == 3
    assert len(parts["language"]) == config.text_config.num_layers == 3
    assert parts["bridge"] == []
    for prefix, part in (("encoder.encoder.layer", "vision"), ("decoder.layer", "language")):
        for i, (name, module) in enumerate(parts[part]):
            assert name == f"{prefix}.{i}"
            assert model.get_submodule(name) is module
    # Text goes in through the decoder, which starts from the pad token as in T5.
    assert config.decoder_start_token_id == tiny.tokenizer.pad_token_id
    assert config.text_config.eos_token_id == tiny.tokenizer.eos_token_id


def test_selection_by_role_picks_the_projections_of_every_layer(tiny):
    model, config = tiny.model, tiny.model.config
    parts = tiny.parts()
    n_text, n_vision = config.text_config.num_layers, config.vision_config.num_hidden_layers

    def names(**kw):
        return [r.name for r in select_modules(model, parts, **kw)]

    self_attn = {"self_attention.attention": QKVO}
    cross_attn = {"encoder_decoder_attention.attention": QKVO}
    both = {**self_attn, **cross_attn}
    assert names(part="language", role="attention") == _expected_linears("decoder.layer", n_text, both)
    assert names(part="language", role="self_attention") == _expected_linears("decoder.layer", n_text, self_attn)
    assert names(part="language", role="cross_attention") == _expected_linears("decoder.layer", n_text, cross_attn)
    assert names(part="language", role="mlp") == _expected_linears(
        "decoder.layer", n_text, {"mlp.DenseReluDense": GATED_MLP}
    )
    assert names(part="vision", role="attention") == _expected_linears(
        "encoder.encoder.layer", n_vision, {"attention": QKVO}
    )
    assert names(part="vision", role="mlp") == _expected_linears("encoder.encoder.layer", n_vision, {"mlp": GATED_MLP})
    # Outside the layers: the patch projection and the LM head are never picked by part.
    everything = set(names(part="all"))
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears - everything == {"encoder.embeddings.patch_projection", "decoder.lm_head"}
    assert names(part="language", position="last", role="mlp") == [
        f"decoder.layer.{n_text - 1}.mlp.DenseReluDense.{p}" for p in GATED_MLP
    ]


def test_encode_puts_the_prompt_in_the_decoder_and_learns_only_the_answer(tiny, adapter, shapes_root, shapes_train):
    tok, config = tiny.tokenizer, tiny.model.config
    images = [open_image(shapes_root, p) for p in shapes_train["image"][:2]]
    question = shapes_train["question"][0]
    prompt = adapter.prompt("vqa", question)
    assert prompt == question
    caption = "two red circles on the left"
    enc = adapter.encode(tiny, images, [prompt, adapter.prompt("captioning")], ["red", caption])
    ids, labels = enc.inputs["decoder_input_ids"], enc.inputs["labels"]
    mask = enc.inputs["decoder_attention_mask"]
    q_ids = tok(question, add_special_tokens=False)["input_ids"]
    start, eos = config.decoder_start_token_id, config.text_config.eos_token_id
    assert enc.prompt_length == 1 + len(q_ids)
    # Row 0: start, question, answer; the labels are the next ids, learned only after the question.
    red = tok.convert_tokens_to_ids("red")
    assert ids[0].tolist() == [start, *q_ids, red]
    assert labels[0].tolist() == [-100] * len(q_ids) + [red, eos]
    # Row 1 (captioning, shorter): the caption then the end token, the rest is padding.
    cap_ids = tok(caption, add_special_tokens=False)["input_ids"]
    n = len(cap_ids) + 1
    assert ids[1, :n].tolist() == [start, *cap_ids]
    assert labels[1, :n].tolist() == [*cap_ids, eos]
    assert mask[1].tolist() == [1] * n + [0] * (ids.shape[1] - n)
    assert (labels[mask == 0] == -100).all()
    # Images become flattened patches: (B, n, 2 + p*p*3) with 1-based row/column ids first.
    patches, patch_mask = enc.inputs["flattened_patches"], enc.inputs["attention_mask"]
    p = adapter.tiny_patch_size
    side = 64 // p
    assert patches.shape == (2, side * side, 2 + p * p * 3)
    assert 2 + p * p * 3 == 2 + config.vision_config.patch_embed_hidden_size
    positions = {(int(r), int(c)) for r, c in patches[0, :, :2].tolist()}
    assert positions == {(r, c) for r in range(1, side + 1) for c in range(1, side + 1)}
    assert patch_mask.shape == (2, side * side) and bool((patch_mask == 1).all())
    # Without targets the decoder holds the prompt only.
    plain = adapter.encode(tiny, None, [prompt])
    assert plain.inputs["decoder_input_ids"].tolist() == [[start, *q_ids]]
    assert "labels" not in plain.inputs and "flattened_patches" not in plain.inputs


def test_vqa_checkpoints_render_the_question_as_a_header(tiny, adapter, shapes_root, shapes_train, monkeypatch):
    """With ``is_vqa`` (Pix2Struct's VQA checkpoints) the question is drawn onto the image, not decoded."""
    from PIL import Image, ImageDraw, ImageFont
    from transformers.models.pix2struct import image_processing_pil_pix2struct as module

    def render_text(text, **_):
        # The processor's default font is downloaded from the hub; Pillow's built-in one works offline.
        img = Image.new("RGB", (160, 16), "white")
        ImageDraw.Draw(img).text((2, 2), text, fill="black", font=ImageFont.load_default(size=10))
        return img

    monkeypatch.setattr(module, "render_text", render_text)
    processor = copy.deepcopy(tiny.processor)
    processor.image_processor.is_vqa = True
    vqa = LoadedModel(tiny.model, processor, tiny.family, adapter, source=tiny.source)
    image = open_image(shapes_root, shapes_train["image"][0])
    questions = ["what shape is shown?", "how many shapes are there?"]
    enc = adapter.encode(vqa, [image, image], questions, ["square", "one"])
    start = tiny.model.config.decoder_start_token_id
    assert enc.prompt_length == 1
    assert enc.inputs["decoder_input_ids"][:, 0].tolist() == [start, start]
    tok = tiny.tokenizer
    learned = enc.inputs["labels"][0][enc.inputs["labels"][0] != -100].tolist()
    assert tok.convert_ids_to_tokens(learned) == ["square", "</s>"]
    patches = enc.inputs["flattened_patches"]
    assert not torch.equal(patches[0], patches[1])
    plain = adapter.encode(tiny, [image], [questions[0]]).inputs["flattened_patches"]
    assert not torch.equal(patches[0], plain[0])
    out = adapter.generate(vqa, adapter.encode(vqa, [image], questions[:1]), **GREEDY)
    assert len(out) == 1 and len(tok(out[0], add_special_tokens=False)["input_ids"]) <= GREEDY["max_new_tokens"]


def test_training_lowers_the_loss_and_uses_the_image(trained):
    loaded, losses, batch = trained
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.4 * losses[0]
    model = loaded.model
    with torch.no_grad():
        own = float(model(**batch.inputs).loss)
        shuffled = dict(batch.inputs, flattened_patches=batch.inputs["flattened_patches"].roll(1, dims=0))
        other = float(model(**shuffled).loss)
    print(f"pix2struct tiny: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {TRAIN_STEPS} steps; {own:.3f} vs {other:.3f}")
    # The captions depend on the image: someone else's image makes them much less likely.
    assert own < 0.7 * other


def test_encode_with_targets_gives_a_finite_loss_with_gradients(tiny, adapter, shapes_root, shapes_train):
    model = copy.deepcopy(tiny.model).train()
    loaded = LoadedModel(model, tiny.processor, tiny.family, adapter)
    images = [open_image(shapes_root, p) for p in shapes_train["image"][:2]]
    enc = adapter.encode(loaded, images, ["", adapter.prompt("vqa", shapes_train["question"][1])], ["a circle", "red"])
    loss = model(**enc.inputs).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name in ("encoder.embeddings.patch_projection.weight", "decoder.layer.0.self_attention.attention.query.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and float(grad.abs().sum()) > 0, name


def _generate_all(loaded, images, prompts, batch_size):
    out = []
    for s in range(0, len(images), batch_size):
        enc = loaded.adapter.encode(loaded, images[s : s + batch_size], prompts[s : s + batch_size])
        out += loaded.adapter.generate(loaded, enc, **GREEDY)
    return out


def test_save_and_reload_give_identical_generations(trained, shapes_root, shapes_test, tmp_path):
    loaded = trained[0]
    loaded.save(tmp_path / "m")
    again = Pix2StructAdapter().from_pretrained(str(tmp_path / "m"))
    for (k, a), b in zip(loaded.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert again.processor.image_processor.max_patches == loaded.processor.image_processor.max_patches
    assert not again.processor.image_processor.is_vqa
    rows = shapes_test.iloc[:4]
    images = [open_image(shapes_root, p) for p in rows["image"]]
    adapter = loaded.adapter
    for prompts in ([adapter.prompt("captioning")] * 4, [adapter.prompt("vqa", rows["question"].iloc[0])] * 4):
        first, second = _generate_all(loaded, images, prompts, 4), _generate_all(again, images, prompts, 4)
        assert first == second
    captions = _generate_all(loaded, images, [""] * 4, 4)
    # New text only (no prompt, no special tokens), and it depends on the image.
    assert all(0 < len(loaded.tokenizer(c, add_special_tokens=False)["input_ids"]) <= 8 for c in captions)
    assert len(set(captions)) > 1


def test_batch_of_one_and_of_eight_generate_the_same(trained, shapes_root, shapes_test):
    loaded = trained[0]
    adapter, tok = loaded.adapter, loaded.tokenizer
    captions_images = [open_image(shapes_root, p) for p in shapes_test["image"][:8]]
    prompts = [adapter.prompt("captioning")] * 8
    assert _generate_all(loaded, captions_images, prompts, 8) == _generate_all(loaded, captions_images, prompts, 1)
    # VQA: eight questions of one token length (inference never mixes lengths in a batch).
    lengths = [len(text_ids(tok, adapter.prompt("vqa", q))) for q in shapes_test["question"]]
    length, count = Counter(lengths).most_common(1)[0]
    assert count >= 8
    rows = shapes_test[[n == length for n in lengths]].iloc[:8]
    assert rows["question"].nunique() > 1
    images = [open_image(shapes_root, p) for p in rows["image"]]
    prompts = [adapter.prompt("vqa", q) for q in rows["question"]]
    assert _generate_all(loaded, images, prompts, 8) == _generate_all(loaded, images, prompts, 1)


def _patches_input(loaded, shapes_root, shapes_test):
    images = [open_image(shapes_root, p) for p in shapes_test["image"][:2]]
    return loaded.adapter.encode(loaded, images, ["", ""], ["a circle", "two squares"]).inputs


def test_uniform_4bit_quantizes_every_language_linear(adapter, shapes_texts, shapes_root, shapes_test):
    loaded = adapter.tiny(shapes_texts, seed=0)
    model = loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_variant(model, loaded.parts(), [{"method": "uniform", "bits": 4, "part": "language"}])
    language = {f"{r.name}.weight" for r in select_modules(model, loaded.parts(), part="language")}
    assert len(language) == model.config.text_config.num_layers * (2 * len(QKVO) + len(GATED_MLP))
    for name, value in model.state_dict().items():
        if name in language:
            assert not torch.equal(value, before[name]), name
            # Per-channel 4 bits: at most 16 distinct values per output row.
            assert max(len(torch.unique(row)) for row in value) <= 16, name
        else:
            assert torch.equal(value, before[name]), name
    with torch.no_grad():
        assert torch.isfinite(model(**_patches_input(loaded, shapes_root, shapes_test)).loss)


def test_svd_factorizes_language_attention(adapter, shapes_texts, shapes_root, shapes_test):
    loaded = adapter.tiny(shapes_texts, seed=0)
    model = loaded.model
    apply_variant(model, loaded.parts(), [{"method": "svd", "ratio": 0.5, "part": "language", "role": "attention"}])
    n_text = model.config.text_config.num_layers
    factored = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    assert factored == _expected_linears(
        "decoder.layer", n_text, {"self_attention.attention": QKVO, "encoder_decoder_attention.attention": QKVO}
    )
    with torch.no_grad():
        assert torch.isfinite(model(**_patches_input(loaded, shapes_root, shapes_test)).loss)


def test_svd_factorizes_language_mlp(adapter, shapes_texts, shapes_root, shapes_test):
    loaded = adapter.tiny(shapes_texts, seed=0)
    model = loaded.model
    apply_variant(model, loaded.parts(), [{"method": "svd", "ratio": 0.5, "part": "language", "role": "mlp"}])
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 3 * model.config.text_config.num_layers
    with torch.no_grad():
        assert torch.isfinite(model(**_patches_input(loaded, shapes_root, shapes_test)).loss)


def test_pruned_language_layer_is_saved_and_reloaded(trained, shapes_root, shapes_test, tmp_path):
    loaded = copy.copy(trained[0])
    loaded.model = copy.deepcopy(trained[0].model)
    n = loaded.model.config.text_config.num_layers
    apply_variant(loaded.model, loaded.parts(), [{"method": "prune_layers", "part": "language", "drop_last": 1}])
    assert len(loaded.parts()["language"]) == n - 1
    loaded.save(tmp_path / "pruned")
    again = Pix2StructAdapter().from_pretrained(str(tmp_path / "pruned"))
    assert again.model.config.text_config.num_layers == n - 1
    assert len(again.parts()["language"]) == n - 1
    assert len(again.parts()["vision"]) == loaded.model.config.vision_config.num_hidden_layers
    assert again.model.state_dict().keys() == loaded.model.state_dict().keys()
    images = [open_image(shapes_root, p) for p in shapes_test["image"][:4]]
    assert _generate_all(loaded, images, [""] * 4, 4) == _generate_all(again, images, [""] * 4, 4)


def test_dropping_the_first_language_layer_reloads_the_same_model(
    adapter, shapes_texts, shapes_root, shapes_test, tmp_path
):
    loaded = adapter.tiny(shapes_texts, seed=0)
    key = "decoder.layer.0.self_attention.attention.relative_attention_bias.weight"
    bias = loaded.model.state_dict()[key].clone()
    apply_variant(loaded.model, loaded.parts(), [{"method": "prune_layers", "part": "language", "layers": [0]}])
    # Layer 0 owned the decoder's relative position bias; the layer that took its place owns it now.
    assert loaded.model.decoder.layer[0].self_attention.attention.has_relative_attention_bias
    assert torch.equal(loaded.model.state_dict()[key], bias)
    loaded.save(tmp_path / "pruned0")
    again = Pix2StructAdapter().from_pretrained(str(tmp_path / "pruned0"))
    assert again.model.state_dict().keys() == loaded.model.state_dict().keys()
    assert torch.equal(again.model.state_dict()[key], bias)
    inputs = _patches_input(loaded, shapes_root, shapes_test)
    with torch.no_grad():
        assert torch.equal(loaded.model(**inputs).logits, again.model(**inputs).logits)
    images = [open_image(shapes_root, p) for p in shapes_test["image"][:2]]
    assert _generate_all(loaded, images, [""] * 2, 2) == _generate_all(again, images, [""] * 2, 2)
