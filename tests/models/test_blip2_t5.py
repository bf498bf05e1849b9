"""BLIP-2 with a Flan-T5 language model: the tiny model, its parts, encoding, training, generation, compression."""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
from torch import nn

from tests.models.conftest import caption_batch, train_on_batch
from vlmopt.compress import LowRankLinear, apply_variant
from vlmopt.compress.select import select_modules
from vlmopt.data.images import open_image
from vlmopt.models.blip2_t5 import Blip2T5Adapter

TRAIN_STEPS = 40
TRAIN_BATCH = 12
# T5 blocks: layer.0 self-attention, (decoder only) layer.1 cross-attention, then the gated-GELU MLP.
ATTENTION = ("q", "k", "v", "o")
MLP = ("wi_0", "wi_1", "wo")


def _counts(config) -> tuple[int, int]:
    return config.text_config.num_layers, config.text_config.num_decoder_layers


def _generate(loaded, images, prompts, max_new_tokens=8):
    encoded = loaded.adapter.encode(loaded, images, prompts)
    return loaded.adapter.generate(loaded, encoded, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)


@pytest.fixture(scope="module")
def tiny(shapes_texts):
    return Blip2T5Adapter().tiny(shapes_texts, seed=0)


@pytest.fixture(scope="module")
def trained(shapes_texts, shapes_root, shapes_train):
    """A tiny model trained on a fixed batch of captions, and its loss per step."""
    loaded = Blip2T5Adapter().tiny(shapes_texts, seed=0)
    encoded = caption_batch(loaded, shapes_root, shapes_train, TRAIN_BATCH)
    losses, _ = train_on_batch(loaded, encoded, steps=TRAIN_STEPS, lr=5e-3)
    return loaded, losses


def test_tiny_model_size_and_parts(tiny):
    config = tiny.model.config
    n_params = sum(p.numel() for p in tiny.model.parameters())
    assert 50_000 < n_params < 300_000
    assert config.text_config.model_type == "t5" and config.text_config.is_encoder_decoder
    n_enc, n_dec = _counts(config)
    parts = tiny.parts()
    assert set(parts) == {"vision", "bridge", "language"}
    assert len(parts["vision"]) == config.vision_config.num_hidden_layers
    assert len(parts["bridge"]) == config.qformer_config.num_hidden_layers
    # One language list: the encoder blocks, then the decoder blocks.
    assert [name for name, _ in parts["language"]] == [f"language_model.encoder.block.{i}" for i in range(n_enc)] + [
        f"language_model.decoder.block.{i}" for i in range(n_dec)
    ]
    for layers in parts.values():
        for name, module in layers:
            assert tiny.model.get_submodule(name) is module


def test_selection_by_part_and_role(tiny):
    model, parts = tiny.model, tiny.parts()
    n_enc, n_dec = _counts(model.config)
    enc = [f"language_model.encoder.block.{i}" for i in range(n_enc)]
    dec = [f"language_model.decoder.block.{i}" for i in range(n_dec)]

    refs = select_modules(model, parts, part="language", role="attention")
    expected = [f"{b}.layer.0.SelfAttention.{p}" for b in enc for p in ATTENTION]
    expected += [
        f"{b}.layer.{j}.{a}.{p}"
        for b in dec
        for j, a in enumerate(("SelfAttention", "EncDecAttention"))
        for p in ATTENTION
    ]
    assert [r.name for r in refs] == expected
    assert {r.name for r in refs if r.attention_kind == "cross"} == {
        f"{b}.layer.1.EncDecAttention.{p}" for b in dec for p in ATTENTION
    }
    cross = select_modules(model, parts, part="language", role="cross_attention")
    assert len(cross) == 4 * n_dec

    refs = select_modules(model, parts, part="language", role="mlp")
    expected = [f"{b}.layer.1.DenseReluDense.{p}" for b in enc for p in MLP]
    expected += [f"{b}.layer.2.DenseReluDense.{p}" for b in dec for p in MLP]
    assert [r.name for r in refs] == expected
    # Thirds count over encoder and decoder blocks together; the LM head is never a layer's module.
    n = n_enc + n_dec
    first = select_modules(model, parts, part="language", position="first")
    assert {r.layer_index for r in first} == set(range(n // 3))
    assert all("lm_head" not in r.name for r in select_modules(model, parts, part="all"))

    n_vision = model.config.vision_config.num_hidden_layers
    vision = [f"vision_model.encoder.layers.{i}" for i in range(n_vision)]
    refs = select_modules(model, parts, part="vision", role="attention")
    assert [r.name for r in refs] == [f"{b}.self_attn.{p}" for b in vision for p in ("qkv", "projection")]
    refs = select_modules(model, parts, part="vision", role="mlp")
    assert [r.name for r in refs] == [f"{b}.mlp.{p}" for b in vision for p in ("fc1", "fc2")]


def test_encode_labels_and_gradients(shapes_texts, shapes_root, shapes_train):
    loaded = Blip2T5Adapter().tiny(shapes_texts, seed=1)
    adapter, tok, config = loaded.adapter, loaded.tokenizer, loaded.model.config
    rows = shapes_train.iloc[:3]
    images = [open_image(shapes_root, rel) for rel in rows["image"]]
    prompts = [adapter.prompt("vqa", rows["question"].iloc[0]), "", ""]
    targets = ["red", "two red circles on the left", "one blue square"]
    enc = adapter.encode(loaded, images, prompts, targets)
    ids, mask = enc.inputs["input_ids"], enc.inputs["attention_mask"]
    labels, dec_ids, dec_mask = (
        enc.inputs["labels"],
        enc.inputs["decoder_input_ids"],
        enc.inputs["decoder_attention_mask"],
    )
    eos, nq = config.text_config.eos_token_id, config.num_query_tokens

    # Encoder: the query-token placeholders, the prompt, </s>; right padding masked.
    prompt_ids = tok(prompts[0], add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == [config.image_token_index] * nq + prompt_ids + [eos]
    assert enc.prompt_length == nq + len(prompt_ids) + 1
    assert ids[1, : nq + 1].tolist() == [config.image_token_index] * nq + [eos] and mask[1].sum() == nq + 1
    # Decoder: labels are the target and </s>; the decoder input is them shifted right.
    assert tok.convert_ids_to_tokens(labels[0][labels[0] != -100].tolist()) == ["red", "</s>"]
    assert (labels[dec_mask == 0] == -100).all() and (labels[dec_mask == 1] != -100).all()
    assert (dec_ids[:, 0] == config.text_config.decoder_start_token_id).all()
    assert torch.equal(dec_ids[1, 1:], labels[1, :-1])

    model = loaded.model.train()
    out = model(**enc.inputs)
    assert torch.isfinite(out.loss)
    # The explicit decoder input is what T5 builds from the labels itself.
    without = {k: v for k, v in enc.inputs.items() if k not in ("decoder_input_ids", "decoder_attention_mask")}
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**enc.inputs).loss, model(**without).loss, atol=1e-6)
        # Calibration drops the labels; the decoder still runs on the target.
        logits = model(**{k: v for k, v in enc.inputs.items() if k != "labels"}).logits
    assert logits.shape == (3, labels.shape[1], config.text_config.vocab_size)
    model.train()
    out.loss.backward()
    for name in (
        "vision_model.embeddings.patch_embedding.weight",
        "query_tokens",
        "qformer.encoder.layer.0.crossattention.attention.query.weight",
        "language_projection.weight",
        "language_model.encoder.block.0.layer.0.SelfAttention.q.weight",
        "language_model.decoder.block.0.layer.1.EncDecAttention.k.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_training_lowers_the_loss(trained):
    loaded, losses = trained
    vocab = loaded.model.config.text_config.vocab_size
    # Unit-scale initial logits: near the uniform loss, not the ~sqrt(d_model) wide logits of T5's own init.
    assert losses[0] < 1.5 * math.log(vocab)
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.4 * losses[0]


def test_save_and_reload_generate_identically(trained, shapes_root, shapes_test, tmp_path):
    loaded, _ = trained
    loaded.save(tmp_path / "m")
    again = Blip2T5Adapter().from_pretrained(str(tmp_path / "m"))
    assert again.family == "blip2-t5"
    reloaded = again.model.state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, reloaded[key]), key
    images = [open_image(shapes_root, rel) for rel in shapes_test["image"][:4]]
    tok = loaded.tokenizer
    for task, question in (("captioning", None), ("vqa", shapes_test["question"].iloc[0])):
        prompt = loaded.adapter.prompt(task, question)
        first = _generate(loaded, images, [prompt] * 4)
        assert first == _generate(again, images, [prompt] * 4)
        # New text only: at most 8 tokens, without the prompt.
        assert all(len(tok(o, add_special_tokens=False)["input_ids"]) <= 8 for o in first)
        assert not any(o.startswith("question") for o in first)
    # The trained model writes words for the captions.
    assert all(o.strip() for o in _generate(loaded, images, [""] * 4))


def test_batch_of_one_and_of_eight_agree(trained, shapes_root, shapes_test):
    loaded, _ = trained
    tok = loaded.tokenizer
    prompts = [loaded.adapter.prompt("vqa", q) for q in shapes_test["question"]]
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    common = Counter(lengths).most_common(1)[0][0]
    rows = [i for i, n in enumerate(lengths) if n == common][:8]
    assert len(rows) == 8
    images = [open_image(shapes_root, shapes_test["image"].iloc[i]) for i in rows]
    for batch_prompts in ([prompts[i] for i in rows], [""] * 8):
        together = _generate(loaded, images, batch_prompts)
        alone = [_generate(loaded, [im], [p])[0] for im, p in zip(images, batch_prompts, strict=True)]
        assert together == alone


def test_uniform_4_bit_on_the_language_model(trained, shapes_root, shapes_test):
    loaded, _ = trained
    quantized = copy.copy(loaded)
    quantized.model = copy.deepcopy(loaded.model)
    n_enc, n_dec = _counts(loaded.model.config)
    manifest = apply_variant(quantized.model, quantized.parts(), [{"method": "uniform", "bits": 4, "part": "language"}])
    step = manifest["steps"][0]
    assert step["n_modules"] == n_enc * (4 + 3) + n_dec * (4 + 4 + 3)
    weight = quantized.model.get_submodule("language_model.decoder.block.1.layer.2.DenseReluDense.wo").weight
    assert max(len(torch.unique(row)) for row in weight) <= 16
    original = loaded.model.state_dict()
    for key, value in quantized.model.state_dict().items():
        if not key.startswith("language_model.") or "block" not in key or "layer_norm" in key or "relative" in key:
            assert torch.equal(value, original[key]), key
    images = [open_image(shapes_root, rel) for rel in shapes_test["image"][:2]]
    assert len(_generate(quantized, images, [""] * 2)) == 2


def test_svd_on_language_attention(tiny, shapes_root, shapes_test):
    model = copy.deepcopy(tiny.model)
    apply_variant(
        model, tiny.adapter.parts(model), [{"method": "svd", "ratio": 0.5, "part": "language", "role": "attention"}]
    )
    assert isinstance(model.get_submodule("language_model.decoder.block.0.layer.1.EncDecAttention.k"), LowRankLinear)
    images = [open_image(shapes_root, rel) for rel in shapes_test["image"][:2]]
    enc = tiny.adapter.encode(tiny, images, ["", ""], ["one red circle", "two blue squares"])
    with torch.no_grad():
        assert torch.isfinite(model(**enc.inputs).loss)


def test_svd_on_language_mlp(tiny, shapes_root, shapes_test):
    model = copy.deepcopy(tiny.model)
    apply_variant(
        model, tiny.adapter.parts(model), [{"method": "svd", "ratio": 0.5, "part": "language", "role": "mlp"}]
    )
    images = [open_image(shapes_root, rel) for rel in shapes_test["image"][:2]]
    enc = tiny.adapter.encode(tiny, images, ["", ""], ["one red circle", "two blue squares"])
    with torch.no_grad():
        assert torch.isfinite(model(**enc.inputs).loss)


def test_prune_last_language_layer_reloads(shapes_texts, shapes_root, shapes_test, tmp_path):
    loaded = Blip2T5Adapter().tiny(shapes_texts, seed=0)
    n_enc, n_dec = _counts(loaded.model.config)
    n = len(loaded.parts()["language"])
    images = [open_image(shapes_root, rel) for rel in shapes_test["image"][:3]]
    enc = loaded.adapter.encode(loaded, images, [""] * 3, ["one red circle", "two blue squares", "a circle"])
    apply_variant(loaded.model, loaded.parts(), [{"method": "prune_layers", "part": "language", "drop_last": 1}])
    # The part's last layer is the decoder's last block: the encoder keeps its blocks.
    assert _counts(loaded.model.config) == (n_enc, n_dec - 1)
    assert len(loaded.model.language_model.decoder.block) == n_dec - 1
    loaded.save(tmp_path / "pruned")
    again = Blip2T5Adapter().from_pretrained(str(tmp_path / "pruned"))
    assert len(again.parts()["language"]) == n - 1
    assert _counts(again.model.config) == (n_enc, n_dec - 1)
    assert again.model.state_dict().keys() == loaded.model.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(again.model(**enc.inputs).logits, loaded.model(**enc.inputs).logits)
    assert _generate(loaded, images, [""] * 3) == _generate(again, images, [""] * 3)


def test_dropping_the_last_decoder_block_reloads(trained, shapes_root, shapes_test, tmp_path):
    """By hand, what prune_layers does for T5's decoder: shrink decoder.block and num_decoder_layers."""
    loaded, _ = trained
    pruned = copy.copy(loaded)
    pruned.model = copy.deepcopy(loaded.model)
    n_enc, n_dec = _counts(loaded.model.config)
    blocks = pruned.model.language_model.decoder.block
    del blocks[len(blocks) - 1]
    pruned.model.config.text_config.num_decoder_layers = n_dec - 1
    pruned.save(tmp_path / "pruned")
    again = Blip2T5Adapter().from_pretrained(str(tmp_path / "pruned"))
    language = again.parts()["language"]
    assert len(language) == n_enc + n_dec - 1
    assert language[-1][0] == f"language_model.decoder.block.{n_dec - 2}"
    assert isinstance(again.model.get_submodule(f"{language[-1][0]}.layer.2.DenseReluDense.wo"), nn.Linear)
    images = [open_image(shapes_root, rel) for rel in shapes_test["image"][:3]]
    assert _generate(pruned, images, [""] * 3) == _generate(again, images, [""] * 3)
