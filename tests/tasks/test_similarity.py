"""Retrieval and zero-shot classification: metrics, scores from the model's own heads, any shard layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmopt.data.images import open_image
from vlmopt.infer import NOT_RERANKED
from vlmopt.metrics import retrieval_recall, topk_accuracy
from vlmopt.models import load_model
from vlmopt.pipeline import gather_predictions, predict_shard, score_predictions
from vlmopt.tables import read_predictions

SETTINGS = {"batch_size": 24, "max_new_tokens": 5, "num_beams": 1}
KEYS = {"model": "m", "ft": "none", "variant": "baseline", "dataset": "shapes"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_retrieval_recall_worked_example():
    # 3 images, 2 captions each (texts 0-1 belong to image 0, 2-3 to image 1, 4-5 to image 2).
    i2t = np.array(
        [
            [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # image 0: its caption 0 first -> rank 0
            [0.9, 0.0, 0.1, 0.2, 0.8, 0.0],  # image 1: best own caption (3) is 3rd -> rank 2
            [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],  # image 2: all tied; stable order puts its captions (4, 5) last
        ]
    )
    t2i = i2t.T.copy()
    img2txt, txt2img = [[0, 1], [2, 3], [4, 5]], [0, 0, 1, 1, 2, 2]
    r = retrieval_recall(i2t, t2i, img2txt, txt2img, ks=(1, 3, 5))
    assert r["txt_r1"] == pytest.approx(100 / 3)
    assert r["txt_r3"] == pytest.approx(200 / 3)
    assert r["txt_r5"] == pytest.approx(100.0)
    # Text -> image ranks (columns of i2t): t0 [.9,.9,.5] own 0 -> 0 (tie, index order); t1 [.1,0,.5] -> 1;
    # t2 [.8,.1,.5] own 1 -> 2; t3 [0,.2,.5] -> 1; t4 [0,.8,.5] own 2 -> 1; t5 [0,0,.5] -> 0.
    assert r["img_r1"] == pytest.approx(200 / 6)
    assert r["img_r3"] == pytest.approx(100.0)
    assert r["r_mean"] == pytest.approx((r["txt_r_mean"] + r["img_r_mean"]) / 2)
    # An unreadable image (NaN row) is a miss both ways, not a crash.
    i2t[0] = np.nan
    t2i[:, 0] = np.nan
    r = retrieval_recall(i2t, t2i, img2txt, txt2img, ks=(1,))
    assert r["txt_r1"] == 0.0 and r["img_r1"] == pytest.approx(100 / 6)  # only t5 still ranks its image first


def test_topk_accuracy_worked_example():
    scores = np.array([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0], [0.3, 0.2, 0.1, 0.0, 0.0, 0.0], [np.nan] * 6])
    acc = topk_accuracy(scores, [1, 2, 0], ks=(1, 3, 5, 6))
    # Row 0 right at top-1; row 1's class 2 is 3rd; row 2 failed. k = 6 (all classes) is not reported.
    assert acc == {"top1": pytest.approx(100 / 3), "top3": pytest.approx(200 / 3), "top5": pytest.approx(200 / 3)}
    with pytest.raises(ValueError, match="one target list per row"):
        topk_accuracy(scores, [1, 2])


@pytest.fixture(scope="module", params=["clip", "blip-itm"])
def model_dir(request, tmp_path_factory, shapes_texts):
    folder = tmp_path_factory.mktemp(request.param)
    load_model(f"tiny:{request.param}", texts=shapes_texts, seed=0).save(folder)
    return folder


def _predict(model_dir, shapes_root, out_dir, task, *, n_shards, batch_size, task_settings):
    shards = []
    for i in range(1, n_shards + 1):
        path = out_dir / f"shard-{i}-of-{n_shards}.parquet"
        predict_shard(
            model_dir,
            shapes_root / "test.parquet",
            shapes_root,
            path,
            task=task,
            shard=f"{i}-of-{n_shards}",
            settings={**SETTINGS, "batch_size": batch_size},
            task_settings=task_settings,
        )
        shards.append(path)
    gather_predictions(shards, shapes_root / "test.parquet", out_dir / "predictions.parquet")
    return out_dir / "predictions.parquet"


@pytest.mark.parametrize(
    ("task", "task_settings"),
    [("classification", {"templates": ["a photo of a {}.", "{} image"]}), ("retrieval", {"k": 5})],
)
def test_scores_do_not_depend_on_shards_or_batch_size(model_dir, shapes_root, task, task_settings, tmp_path):
    runs = []
    for n_shards, batch_size in ((1, 24), (3, 1)):
        out = tmp_path / f"{n_shards}-{batch_size}"
        preds = _predict(
            model_dir, shapes_root, out, task, n_shards=n_shards, batch_size=batch_size, task_settings=task_settings
        )
        metrics = score_predictions(
            preds, shapes_root / "test.parquet", out / "scores.parquet", keys={**KEYS, "task": task}, settings={}
        )
        runs.append((read_predictions(preds), metrics))
    (a, meta), metrics_a = runs[0]
    (b, _), metrics_b = runs[1]
    assert meta["task_settings"] == task_settings
    assert a["error"].isna().all()
    np.testing.assert_allclose(np.stack(a["scores"]), np.stack(b["scores"]), atol=1e-5)
    assert metrics_a == pytest.approx(metrics_b)
    expected = {"top1"} if task == "classification" else {"txt_r1", "img_r10", "r_mean"}
    assert expected <= set(metrics_a)


def test_classification_scores_are_clip_cosines_of_the_template_ensemble(shapes_texts, shapes_root, shapes_test):
    loaded = load_model("tiny:clip", texts=shapes_texts, seed=0)
    from vlmopt.infer import predict

    templates = ["a photo of a {}.", "{} image"]
    df = predict(
        loaded,
        shapes_test,
        shapes_root,
        "classification",
        batch_size=8,
        generate_kwargs={},
        task_settings={"templates": templates},
        progress=False,
    )
    labels = sorted(set(zip(shapes_test["label"], shapes_test["label_name"], strict=True)))
    names = [n for _, n in labels]
    # Independently: CLIPModel's own forward gives logit_scale * cosine for every (image, text).
    images = [open_image(shapes_root, p) for p in shapes_test["image"][:4]]
    texts = [t.format(n) for n in names for t in templates]
    tok = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    pixels = loaded.processor.image_processor(images=[np.asarray(i) for i in images], return_tensors="pt")
    with torch.no_grad():
        out = loaded.model(
            input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixels["pixel_values"]
        )
    text_emb = out.text_embeds.view(len(names), len(templates), -1).mean(1)
    text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
    expected = out.image_embeds @ text_emb.T
    np.testing.assert_allclose(np.stack(df["scores"][:4]), expected.numpy(), atol=1e-5)
    assert list(df["prediction"][:4]) == [names[i] for i in expected.argmax(1)]


def test_retrieval_reranks_the_top_k_with_the_matching_head(shapes_texts, shapes_root, shapes_test):
    from vlmopt.infer import predict
    from vlmopt.tasks import RetrievalTask

    loaded = load_model("tiny:blip-itm", texts=shapes_texts, seed=0)
    k = 4
    df = predict(
        loaded,
        shapes_test,
        shapes_root,
        "retrieval",
        batch_size=8,
        generate_kwargs={},
        task_settings={"k": k},
        progress=False,
    )
    texts, _ = RetrievalTask.texts(shapes_test)
    adapter = loaded.adapter
    images = [open_image(shapes_root, p) for p in shapes_test["image"]]
    with torch.no_grad():
        itc = adapter.embed_images(loaded, images) @ adapter.embed_texts(loaded, texts).T
        # Image 0: its k best texts by ITC score ITM + ITC, every other text -100.
        i2t = np.asarray(df["scores"][0])
        top = itc[0].topk(k).indices
        assert set(np.flatnonzero(i2t != NOT_RERANKED)) == set(top.tolist())
        itm = adapter.match(loaded, [images[0]] * k, [texts[j] for j in top])
        np.testing.assert_allclose(i2t[top], (itm + itc[0, top]).numpy(), atol=1e-5)
        # Text -> image: a text's column is re-ranked only for its k most similar images.
        t2i = np.stack(df["scores_t2i"])  # images x texts
        for j in (0, 7, len(texts) - 1):
            assert set(np.flatnonzero(t2i[:, j] != NOT_RERANKED)) == set(itc[:, j].topk(k).indices.tolist())
    # CLIP has no matching head: k is ignored and both directions are the cosine matrix.
    clip = load_model("tiny:clip", texts=shapes_texts, seed=0)
    df = predict(
        clip,
        shapes_test,
        shapes_root,
        "retrieval",
        batch_size=8,
        generate_kwargs={},
        task_settings={"k": k},
        progress=False,
    )
    np.testing.assert_array_equal(np.stack(df["scores"]), np.stack(df["scores_t2i"]))
    assert (np.stack(df["scores"]) > -1.0001).all()


def test_generative_family_refuses_similarity_tasks(shapes_texts, shapes_root, shapes_test):
    from vlmopt.infer import predict

    loaded = load_model("tiny:blip", texts=shapes_texts, seed=0)
    with pytest.raises(ValueError, match="cannot run task 'retrieval'"):
        predict(loaded, shapes_test, shapes_root, "retrieval", batch_size=8, generate_kwargs={})
    bad = shapes_test.assign(label_name=["x"] + list(shapes_test["label_name"][1:]))
    clip = load_model("tiny:clip", texts=shapes_texts, seed=0)
    with pytest.raises(ValueError, match="has two names"):
        predict(clip, bad, shapes_root, "classification", batch_size=8, generate_kwargs={})
