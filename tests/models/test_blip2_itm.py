"""BLIP-2 retrieval family: tiny build, parts and selection, ITC and ITM against the model's own forward, reload,
retrieval and classification through the pipeline, ITC + ITM training, every compression method on the ViT and
the Q-Former."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Blip2ForImageTextRetrieval

from vlmopt.compress import METHODS
from vlmopt.compress.select import NothingSelectedError, select_modules
from vlmopt.data.images import open_image
from vlmopt.infer import NOT_RERANKED, predict
from vlmopt.models import family_of_config, load_model
from vlmopt.models.blip2_itm import Blip2ItmAdapter

ADAPTER = Blip2ItmAdapter()
# Module names inside one layer, in the transformers source (models/blip_2/modeling_blip_2.py):
# Blip2QFormerLayer with use_qformer_text_input, and the BLIP-2 ViT's Blip2EncoderLayer.
QFORMER_SELF = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
QFORMER_SELF += ("attention.output.dense",)
QFORMER_CROSS = tuple(name.replace("attention.", "crossattention.", 1) for name in QFORMER_SELF)
QFORMER_MLP = ("intermediate_query.dense", "output_query.dense", "intermediate.dense", "output.dense")
VISION_ATTENTION = ("self_attn.qkv", "self_attn.projection")
VISION_MLP = ("mlp.fc1", "mlp.fc2")
BRIDGE = "qformer.encoder.layer"
VISION = "vision_model.encoder.layers"
#: Captions of several token lengths, so that padding is exercised.
TEXTS = [
    "a red circle",
    "two blue squares on the left of a green triangle",
    "one shape",
    "a photo of a red circle on the right",
]


@pytest.fixture(scope="module")
def tiny(shapes_texts):
    return ADAPTER.tiny(shapes_texts, seed=0)


@pytest.fixture(scope="module")
def test_images(shapes_root, shapes_test):
    return [open_image(shapes_root, rel) for rel in shapes_test["image"][:8]]


def _model_inputs(loaded, images, texts):
    """Pixels and padded ids exactly as the checkpoint's own processor pieces give them."""
    tok = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    pixels = loaded.processor.image_processor(images=[np.asarray(i) for i in images], return_tensors="pt")
    return {
        "pixel_values": pixels["pixel_values"],
        "input_ids": tok["input_ids"],
        "attention_mask": tok["attention_mask"],
    }


def _scores(loaded, images, texts):
    """ITC matrix (images x texts) and ITM logits of the pairs (images[i], texts[i])."""
    adapter = loaded.adapter
    with torch.no_grad():
        itc = adapter.similarity(loaded, adapter.embed_images(loaded, images), adapter.embed_texts(loaded, texts))
        itm = adapter.match(loaded, images[: len(texts)], texts[: len(images)])
    return itc, itm


def test_tiny_model_size_config_and_parts(tiny):
    model, config = tiny.model, tiny.model.config
    assert isinstance(model, Blip2ForImageTextRetrieval) and tiny.family == "blip2-itm" == ADAPTER.name
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 < n_params < 500_000
    q = config.qformer_config
    # A retrieval Q-Former: text input, cross-attention in every layer, the tokenizer's vocabulary and pad id.
    assert q.use_qformer_text_input and q.cross_attention_frequency == 1
    assert q.vocab_size == len(tiny.tokenizer) and q.pad_token_id == tiny.tokenizer.pad_token_id == 0
    assert config.image_token_index is None
    assert model.query_tokens.shape == (1, config.num_query_tokens, q.hidden_size)
    # Random query tokens (zeros would make every query output the same).
    assert model.query_tokens.std() > 0.005

    parts = tiny.parts()
    assert parts["language"] == []
    assert len(parts["vision"]) == config.vision_config.num_hidden_layers == 3
    assert len(parts["bridge"]) == q.num_hidden_layers == 3
    for prefix, part in ((VISION, "vision"), (BRIDGE, "bridge")):
        for i, (name, module) in enumerate(parts[part]):
            assert name == f"{prefix}.{i}" and model.get_submodule(name) is module


def test_selection_by_part_and_role(tiny):
    model, parts, config = tiny.model, tiny.parts(), tiny.model.config
    n_bridge, n_vision = config.qformer_config.num_hidden_layers, config.vision_config.num_hidden_layers

    def names(**kwargs):
        return {ref.name for ref in select_modules(model, parts, **kwargs)}

    def expected(prefix, n, locals_):
        return {f"{prefix}.{i}.{local}" for i in range(n) for local in locals_}

    assert names(part="bridge", role="self_attention") == expected(BRIDGE, n_bridge, QFORMER_SELF)
    assert names(part="bridge", role="cross_attention") == expected(BRIDGE, n_bridge, QFORMER_CROSS)
    # Both feed-forwards (queries' and text's) are mlp.
    assert names(part="bridge", role="mlp") == expected(BRIDGE, n_bridge, QFORMER_MLP)
    assert names(part="vision", role="attention") == expected(VISION, n_vision, VISION_ATTENTION)
    assert names(part="vision", role="mlp") == expected(VISION, n_vision, VISION_MLP)
    assert names(part="bridge", position="last") == expected(
        BRIDGE, n_bridge, QFORMER_SELF + QFORMER_CROSS + QFORMER_MLP
    ) - (expected(BRIDGE, 2 * n_bridge // 3, QFORMER_SELF + QFORMER_CROSS + QFORMER_MLP))
    with pytest.raises(NothingSelectedError):
        select_modules(model, parts, part="language")
    everything = names(part="all")
    assert len(everything) == n_vision * 4 + n_bridge * 12
    # Projections and the ITM head are reached only by name.
    assert not {"vision_projection", "text_projection", "itm_head"} & everything
    assert "itm_head" in names(part="bridge", role="mlp", modules=["itm_head"])


def test_itc_scores_are_the_models_own_contrastive_forward(tiny, test_images):
    images = test_images[:4]
    with torch.no_grad():
        image_emb = ADAPTER.embed_images(tiny, images)
        text_emb = ADAPTER.embed_texts(tiny, TEXTS)
        out = tiny.model(**_model_inputs(tiny, images, TEXTS), use_image_text_matching_head=False)
    config = tiny.model.config
    # One normalised vector per query token per image, one per text.
    assert image_emb.shape == (4, config.num_query_tokens, config.image_text_hidden_size)
    assert text_emb.shape == (len(TEXTS), config.image_text_hidden_size)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(4, config.num_query_tokens))
    itc = ADAPTER.similarity(tiny, image_emb, text_emb)
    assert out.logits_per_image.shape == itc.shape == (4, len(TEXTS))
    torch.testing.assert_close(itc, out.logits_per_image, atol=1e-6, rtol=1e-5)
    # The best query differs between pairs, so the score is not one fixed query's cosine.
    best = (image_emb @ text_emb.T).argmax(dim=1)
    assert len(set(best.flatten().tolist())) > 1
    # A text alone scores as it does in a padded batch; an image that failed (NaN) scores NaN.
    with torch.no_grad():
        torch.testing.assert_close(ADAPTER.embed_texts(tiny, TEXTS[2:3]), text_emb[2:3], atol=1e-6, rtol=1e-5)
    failed = torch.cat([image_emb[:1], torch.full_like(image_emb[:1], float("nan"))])
    assert ADAPTER.similarity(tiny, failed, text_emb)[1].isnan().all()


def test_itm_scores_are_the_models_own_matching_forward(tiny, test_images):
    images = test_images[:4]
    inputs = _model_inputs(tiny, images, TEXTS)
    with torch.no_grad():
        itm = ADAPTER.match(tiny, images, TEXTS)
        out = tiny.model(**inputs, use_image_text_matching_head=True)
        # encode() gives the ITM forward too (the one calibration runs).
        encoded = ADAPTER.encode(tiny, images, TEXTS)
        from_encode = tiny.model(**encoded.inputs).logits_per_image
    assert out.logits_per_image.shape == (4, 2)
    torch.testing.assert_close(itm, out.logits_per_image[:, 1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(from_encode, out.logits_per_image, atol=1e-6, rtol=1e-5)
    # The text matters: the same images with the texts in another order score differently.
    with torch.no_grad():
        assert not torch.allclose(ADAPTER.match(tiny, images, TEXTS[::-1]), itm, atol=1e-4)


def test_texts_are_cut_at_35_tokens_as_in_the_blip2_evaluation(tiny):
    words = tiny.tokenizer.tokenize(" ".join(TEXTS))
    long_text = " ".join((words * 5)[:40])
    # LAVIS's compute_sim_matrix tokenizes with max_length=35: [CLS] + 33 words + [SEP].
    cut = " ".join((words * 5)[:33])
    with torch.no_grad():
        torch.testing.assert_close(ADAPTER.embed_texts(tiny, [long_text]), ADAPTER.embed_texts(tiny, [cut]))
        assert not torch.allclose(
            ADAPTER.embed_texts(tiny, [long_text]), ADAPTER.embed_texts(tiny, [" ".join((words * 5)[:32])])
        )
    assert ADAPTER.encode(tiny, None, [long_text]).inputs["input_ids"].shape == (1, 35)


def test_save_reload_gives_identical_scores(tiny, test_images, tmp_path):
    folder = tiny.save(tmp_path / "m")
    again = load_model(folder)
    assert again.family == "blip2-itm" and isinstance(again.model, Blip2ForImageTextRetrieval)
    # The saved config names its architecture, which tells it from the generative BLIP-2 families.
    assert again.model.config.architectures == ["Blip2ForImageTextRetrieval"]
    assert family_of_config(again.model.config) == "blip2-itm"
    # A folder as the hub serves it (no vlmopt.json) is recognised by its architecture.
    (folder / "vlmopt.json").unlink()
    assert load_model(folder).family == "blip2-itm"
    assert again.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    for (k, a), b in zip(tiny.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for a, b in zip(_scores(tiny, test_images, TEXTS), _scores(again, test_images, TEXTS), strict=True):
        assert torch.equal(a, b)


def test_retrieval_reranks_the_top_k_by_itm_plus_itc(tiny, shapes_root, shapes_test):
    from vlmopt.tasks import RetrievalTask

    k = 4
    df = predict(
        tiny,
        shapes_test,
        shapes_root,
        "retrieval",
        batch_size=8,
        generate_kwargs={},
        task_settings={"k": k},
        progress=False,
    )
    texts, _ = RetrievalTask.texts(shapes_test)
    images = [open_image(shapes_root, p) for p in shapes_test["image"]]
    # Independently: ITC from the model's own contrastive forward, ITM from its matching forward.
    with torch.no_grad():
        itc = torch.cat(
            [
                tiny.model(**_model_inputs(tiny, images, texts[s : s + 16])).logits_per_image
                for s in range(0, len(texts), 16)
            ],
            dim=1,
        )
        i2t = np.asarray(df["scores"][0])
        top = itc[0].topk(k).indices
        assert set(np.flatnonzero(i2t != NOT_RERANKED)) == set(top.tolist())
        pairs = _model_inputs(tiny, [images[0]] * k, [texts[j] for j in top])
        itm = tiny.model(**pairs, use_image_text_matching_head=True).logits_per_image[:, 1]
    np.testing.assert_allclose(i2t[top], (itm + itc[0, top]).numpy(), atol=1e-5)
    assert df["prediction"][0] == texts[int(np.argmax(i2t))]
    # Text -> image: a text's column is re-ranked only for its k most similar images.
    t2i = np.stack(df["scores_t2i"])
    for j in (0, 7, len(texts) - 1):
        assert set(np.flatnonzero(t2i[:, j] != NOT_RERANKED)) == set(itc[:, j].topk(k).indices.tolist())
    # Without re-ranking both directions are the ITC matrix.
    plain = predict(
        tiny, shapes_test, shapes_root, "retrieval", batch_size=8, generate_kwargs={}, task_settings={}, progress=False
    )
    np.testing.assert_allclose(np.stack(plain["scores"]), itc.numpy(), atol=1e-5)


def test_classification_scores_are_max_over_queries_of_the_template_ensemble(tiny, shapes_root, shapes_test):
    templates = ["a photo of a {}.", "{} image"]
    df = predict(
        tiny,
        shapes_test,
        shapes_root,
        "classification",
        batch_size=8,
        generate_kwargs={},
        task_settings={"templates": templates},
        progress=False,
    )
    names = [n for _, n in sorted(set(zip(shapes_test["label"], shapes_test["label_name"], strict=True)))]
    images = [open_image(shapes_root, p) for p in shapes_test["image"][:4]]
    texts = [t.format(n) for n in names for t in templates]
    with torch.no_grad():
        out = tiny.model(**_model_inputs(tiny, images, texts), use_image_text_matching_head=False)
    class_emb = torch.nn.functional.normalize(out.text_embeds.view(len(names), len(templates), -1).mean(1), dim=-1)
    expected = torch.einsum("iqd,cd->iqc", out.image_embeds, class_emb).amax(dim=1)
    np.testing.assert_allclose(np.stack(df["scores"][:4]), expected.numpy(), atol=1e-5)
    assert list(df["prediction"][:4]) == [names[i] for i in expected.argmax(1)]


def _variants(dataset: str) -> dict[str, list[dict]]:
    """One variant per compression method, on the ViT and the Q-Former (the model has no language part)."""
    calibration = {"dataset": dataset, "split": "train", "n": 8, "batch_size": 4}
    return {
        "uniform": [{"method": "uniform", "bits": 4, "part": "all"}],
        "dynamic_int8": [{"method": "dynamic_int8", "part": "all"}],
        "gptq": [{"method": "gptq", "bits": 4, "group_size": 16, "part": "all", "calibration": calibration}],
        "awq": [{"method": "awq", "bits": 4, "group_size": 16, "part": "bridge", "calibration": calibration}],
        "svd": [{"method": "svd", "ratio": 0.5, "part": "bridge", "role": "mlp"}],
        "prune_layers": [{"method": "prune_layers", "part": "bridge", "drop_last": 1}],
        "prune_heads": [{"method": "prune_heads", "part": "all", "heads": 1}],
        "lora": [
            {
                "method": "lora",
                "part": "bridge",
                "r": 2,
                "dataset": dataset,
                "training": {"max_steps": 4, "batch_size": 8, "lr": 1.0e-2},
            }
        ],
        "precision": [{"method": "precision", "dtype": "bfloat16"}],
    }


def test_every_method_has_a_variant(shapes_root):
    assert set(_variants(shapes_root.name)) == set(METHODS)


@pytest.fixture(scope="module")
def source(tmp_path_factory, shapes_texts):
    return ADAPTER.tiny(shapes_texts, seed=0).save(tmp_path_factory.mktemp("blip2-itm"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_compression_method_changes_saves_and_reloads(method, source, shapes_root, test_images, tmp_path):
    from vlmopt.compress.saved import load_variant
    from vlmopt.pipeline import compress_loaded

    images = test_images[:4]
    dense = _scores(load_model(source), images, TEXTS)
    loaded = load_model(source)
    config = loaded.model.config
    n_bridge, n_vision = config.qformer_config.num_hidden_layers, config.vision_config.num_hidden_layers
    steps = _variants(shapes_root.name)[method]
    manifest = compress_loaded(loaded, tmp_path / method, steps=steps, data_root=shapes_root.parent, source=source)
    assert manifest["methods"] == [method]
    evaluated = _scores(loaded, images, TEXTS)
    for before, after in zip(dense, evaluated, strict=True):
        assert torch.isfinite(after).all()
        assert not torch.allclose(after.float(), before, atol=1e-4), "the variant computes what the dense model does"
    again = load_variant(tmp_path / method)
    for a, b in zip(_scores(again, images, TEXTS), evaluated, strict=True):
        torch.testing.assert_close(a, b)
    step = manifest["steps"][0]
    if method in ("uniform", "dynamic_int8", "gptq"):
        assert step["n_modules"] == n_vision * 4 + n_bridge * 12
    if method in ("uniform", "gptq"):
        # 4 bits, groups of 16 columns: at most 16 distinct values per group, in the ViT and the Q-Former.
        for name in (
            f"{VISION}.0.self_attn.qkv",
            f"{BRIDGE}.2.intermediate.dense",
            f"{BRIDGE}.1.crossattention.attention.key",
        ):
            weight = loaded.model.get_submodule(name).weight
            groups = weight.reshape(weight.shape[0], -1, 16).flatten(0, 1)
            assert max(len(torch.unique(group)) for group in groups) <= 16, name
    if method in ("awq", "lora"):
        assert step["n_modules"] == n_bridge * 12
    if method == "prune_layers":
        assert len(again.parts()["bridge"]) == n_bridge - 1 == again.model.config.qformer_config.num_hidden_layers
    if method == "prune_heads":
        heads = config.qformer_config.num_attention_heads
        attention = again.model.get_submodule(f"{BRIDGE}.0.crossattention.attention")
        assert attention.query.out_features == (heads - 1) * attention.attention_head_size


def test_training_lowers_the_itc_and_itm_loss_with_gradients_everywhere(shapes_texts, shapes_root, shapes_train):
    from vlmopt.tasks import get_task

    loaded = ADAPTER.tiny(shapes_texts, seed=0)
    rows = shapes_train.iloc[:16]
    images = [open_image(shapes_root, rel) for rel in rows["image"]]
    task = get_task(ADAPTER.train_tasks[0])
    encoded = ADAPTER.encode(loaded, images, task.prompts(rows, ADAPTER), task.targets(rows, 0))
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(loaded.model.parameters(), lr=1e-3)
    loaded.model.train()
    losses = []
    for step in range(90):
        loss = ADAPTER.loss(loaded, encoded)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            grads = {n: p.grad for n, p in loaded.model.named_parameters()}
        optimizer.step()
        losses.append(float(loss.detach()))
    loaded.model.eval()
    with torch.no_grad():
        final = float(ADAPTER.loss(loaded, encoded))
    print(f"blip2-itm tiny ITC + ITM loss {losses[0]:.3f} -> {final:.3f}")
    # Both objectives reach the image path, the query tokens, both Q-Former feed-forwards and every head.
    for name in (
        "vision_model.embeddings.patch_embedding.weight",
        "query_tokens",
        f"{BRIDGE}.0.crossattention.attention.query.weight",
        f"{BRIDGE}.0.intermediate_query.dense.weight",
        f"{BRIDGE}.0.intermediate.dense.weight",
        "embeddings.word_embeddings.weight",
        "vision_projection.weight",
        "text_projection.weight",
        "itm_head.weight",
    ):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    # Equal similarities for every pair would score about ln 16 + ln 2 = 3.47 (16 distinct captions).
    assert len(set(task.targets(rows, 0))) == 16
    assert all(np.isfinite(losses)) and final < 0.25 * losses[0] and final < 1.0
    # Trained towards the right targets: each image ranks its own caption first, and the matching
    # head scores true pairs above the same images with their neighbours' captions.
    captions = list(task.targets(rows, 0))
    itc, itm = _scores(loaded, images, captions)
    assert (itc.argmax(1) == torch.arange(16)).float().mean() >= 0.75
    with torch.no_grad():
        shifted = ADAPTER.match(loaded, images, captions[1:] + captions[:1])
    assert (itm > shifted).float().mean() >= 0.75 and itm.mean() > shifted.mean() + 0.3
