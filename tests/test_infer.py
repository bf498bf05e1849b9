from __future__ import annotations

import pandas as pd
import pytest
import torch

from vlmopt.infer import generation_settings, merge_shards, predict, shard_rows
from vlmopt.models import load_model


@pytest.mark.parametrize("n_rows,n_shards", [(0, 2), (7, 3), (24, 3), (5, 8)])
def test_shards_cover_every_row_once(n_rows, n_shards):
    rows = [i for s in range(n_shards) for i in shard_rows(n_rows, s, n_shards)]
    assert rows == list(range(n_rows))


@pytest.fixture(scope="module")
def training_split(tmp_path_factory):
    """A training split large enough for a tiny model to learn to look at the image."""
    from vlmopt.data import make_shapes

    root = tmp_path_factory.mktemp("shapes400")
    make_shapes(root, seed=3, n_train=400, n_val=0, n_test=0, image_size=64)
    return root, pd.read_parquet(root / "train.parquet")


@pytest.fixture(scope="module", params=["blip", "blip2-opt"])
def briefly_trained(request, training_split, tmp_path_factory):
    """A tiny model trained until its captions depend on the image (800 steps, about 20 s)."""
    from vlmopt.data import dataset_texts
    from vlmopt.finetune.config import FullFinetuneConfig
    from vlmopt.finetune.full import finetune

    root, train = training_split
    loaded = load_model(f"tiny:{request.param}", texts=dataset_texts(train), seed=1)
    config = FullFinetuneConfig(epochs=100, batch_size=16, lr=2e-3, max_steps=800)
    finetune(loaded, train, root, config, checkpoint_dir=tmp_path_factory.mktemp("ck"), progress=False)
    return loaded


@pytest.mark.parametrize("task", ["captioning", "vqa"])
def test_predictions_do_not_depend_on_batch_size_or_shards(briefly_trained, shapes_test, shapes_root, task):
    gen = generation_settings(max_new_tokens=8, num_beams=1)
    one = predict(briefly_trained, shapes_test, shapes_root, task, batch_size=1, generate_kwargs=gen, progress=False)
    shards = [
        predict(
            briefly_trained,
            shapes_test,
            shapes_root,
            task,
            batch_size=8,
            generate_kwargs=gen,
            shard=s,
            n_shards=3,
            progress=False,
        )
        for s in range(3)
    ]
    merged = merge_shards(shards, shapes_test)
    assert list(one["sample_id"]) == list(shapes_test["sample_id"])
    assert one["prediction"].tolist() == merged["prediction"].tolist()
    assert one["error"].isna().all()
    # Not a degenerate model: answers depend on the sample.
    assert one["prediction"].nunique() >= 4


def test_unreadable_image_is_recorded_and_counted(briefly_trained, shapes_test, shapes_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(shapes_root, root)
    broken = shapes_test["image"][2]
    (root / broken).write_bytes(b"not a png")
    gen = generation_settings(max_new_tokens=4, num_beams=1)
    out = predict(
        briefly_trained,
        shapes_test,
        root,
        "captioning",
        batch_size=4,
        generate_kwargs=gen,
        max_error_fraction=0.1,
        progress=False,
    )
    assert out["error"].notna().sum() == 1
    assert broken.split("/")[-1] in out["error"][2]
    assert out["prediction"][2] == ""
    with pytest.raises(RuntimeError, match="1 of 24 samples failed"):
        predict(
            briefly_trained,
            shapes_test,
            root,
            "captioning",
            batch_size=4,
            generate_kwargs=gen,
            max_error_fraction=0.0,
            progress=False,
        )


def test_merge_refuses_duplicates_and_gaps(shapes_test):
    part = pd.DataFrame({"sample_id": shapes_test["sample_id"][:5], "prediction": "x", "error": None})
    with pytest.raises(ValueError, match="predicted twice"):
        merge_shards([part, part], shapes_test)
    with pytest.raises(ValueError, match="missing from the shards"):
        merge_shards([part], shapes_test)


# Streaming: the predictions of opening every image of the shard first, as inference did before it
# read images batch by batch, written out here as the reference.


def _reference(loaded, dataset, root, task, *, batch_size, gen, task_settings=None, shard=0, n_shards=1):
    """Every image of the shard opened at once, then batches of one prompt length (or the old similarity path)."""
    from collections import defaultdict

    from vlmopt.data.images import open_image
    from vlmopt.device import to_model_device
    from vlmopt.models.encoding import text_ids
    from vlmopt.tasks import get_task

    spec = get_task(task)
    selected = list(shard_rows(len(dataset), shard, n_shards))
    rows = dataset.iloc[selected].reset_index(drop=True)
    errors = [None] * len(rows)
    images = {}
    for i, rel in enumerate(rows["image"]):
        try:
            images[i] = open_image(root, rel)
        except OSError as exc:
            errors[i] = str(exc)
    columns = {"sample_id": rows["sample_id"].astype(str)}
    with torch.inference_mode():
        if spec.kind == "similarity":
            columns.update(
                _reference_similarity(loaded, dataset, root, task, selected, images, batch_size, task_settings)
            )
        else:
            prompts = spec.prompts(rows, loaded.adapter)
            predictions = [""] * len(rows)
            buckets = defaultdict(list)
            for i in images:
                buckets[len(text_ids(loaded.tokenizer, prompts[i]))].append(i)
            for _, idx in sorted(buckets.items()):
                for s in range(0, len(idx), batch_size):
                    batch = idx[s : s + batch_size]
                    encoded = loaded.adapter.encode(loaded, [images[i] for i in batch], [prompts[i] for i in batch])
                    encoded.inputs = to_model_device(encoded.inputs, loaded.model)
                    for i, text in zip(batch, loaded.adapter.generate(loaded, encoded, **gen), strict=True):
                        predictions[i] = text.strip()
            columns["prediction"] = pd.Series(predictions, dtype="string")
    columns["error"] = pd.Series(errors, dtype="string")
    return pd.DataFrame(columns)


def _reference_similarity(loaded, dataset, root, task, selected, images, batch_size, settings):
    from vlmopt.data.images import open_image
    from vlmopt.infer import NOT_RERANKED
    from vlmopt.tasks import ClassificationTask, RetrievalTask

    adapter, settings = loaded.adapter, settings or {}

    def in_batches(fn, items):
        return torch.cat([fn(items[s : s + batch_size]).float().cpu() for s in range(0, len(items), batch_size)])

    n = len(selected)
    if task == "classification":
        _, names = ClassificationTask.classes(dataset)
        templates = tuple(settings["templates"])
        flat = [t for texts in ClassificationTask.class_texts(names, templates) for t in texts]
        text_emb = in_batches(lambda b: adapter.embed_texts(loaded, b), flat)
        class_emb = torch.nn.functional.normalize(text_emb.view(len(names), len(templates), -1).mean(1), dim=-1)
        order = sorted(images)
        sims = adapter.similarity(
            loaded, in_batches(lambda b: adapter.embed_images(loaded, [images[i] for i in b]), order), class_emb
        )
        scores, preds = [None] * n, [None] * n
        for at, i in enumerate(order):
            scores[i], preds[i] = sims[at].tolist(), names[int(sims[at].argmax())]
        return {"prediction": pd.Series(preds, dtype="string"), "scores": pd.Series(scores, dtype=object)}
    texts, _ = RetrievalTask.texts(dataset)
    k = int(settings.get("k", 0)) if adapter.matches else 0
    text_emb = in_batches(lambda b: adapter.embed_texts(loaded, b), texts)
    opened = {selected[i]: im for i, im in images.items()}
    if k:
        for g, rel in enumerate(dataset["image"]):
            if g not in opened and g not in selected:
                try:
                    opened[g] = open_image(root, rel)
                except OSError:
                    pass
    order = sorted(opened)
    embedded = in_batches(lambda b: adapter.embed_images(loaded, [opened[g] for g in b]), order)
    image_emb = embedded.new_full((len(dataset), *embedded.shape[1:]), float("nan"))
    image_emb[order] = embedded
    sims = adapter.similarity(loaded, image_emb, text_emb)
    sims[sims.isnan()] = float("-inf")
    scores, scores_t2i, preds = [None] * n, [None] * n, [None] * n
    if k:
        in_t2i = torch.zeros_like(sims, dtype=torch.bool)
        in_t2i.scatter_(0, sims.topk(min(k, len(order)), dim=0).indices, True)
    for i in sorted(images):
        g, row = selected[i], sims[selected[i]]
        if not k:
            scores[i] = scores_t2i[i] = row.tolist()
        else:
            top = row.topk(min(k, len(texts))).indices
            wanted = torch.zeros(len(texts), dtype=torch.bool)
            wanted[top] = True
            wanted |= in_t2i[g]
            pairs = wanted.nonzero().flatten().tolist()
            itm = torch.full((len(texts),), float("nan"))
            itm[pairs] = in_batches(
                lambda b, g=g: adapter.match(loaded, [opened[g]] * len(b), [texts[j] for j in b]), pairs
            )
            i2t = torch.full((len(texts),), NOT_RERANKED)
            i2t[top] = itm[top] + row[top]
            t2i = torch.full((len(texts),), NOT_RERANKED)
            t2i[in_t2i[g]] = itm[in_t2i[g]] + row[in_t2i[g]]
            scores[i], scores_t2i[i] = i2t.tolist(), t2i.tolist()
        preds[i] = texts[int(torch.tensor(scores[i]).argmax())]
    return {
        "prediction": pd.Series(preds, dtype="string"),
        "scores": pd.Series(scores, dtype=object),
        "scores_t2i": pd.Series(scores_t2i, dtype=object),
    }


@pytest.fixture(scope="module")
def broken_root(shapes_root, shapes_test, tmp_path_factory):
    """The shapes data with one unreadable test image (row 5's)."""
    import shutil

    root = tmp_path_factory.mktemp("broken") / "data"
    shutil.copytree(shapes_root, root)
    (root / shapes_test["image"][5]).write_bytes(b"not a png")
    return root


def _shared_images(table):
    """Each row followed by two more rows asking about the same image (VQA: several questions per image)."""
    copies = []
    for _, row in table.iterrows():
        copies.append(row)
        for n in (1, 2):
            copies.append(row.copy())
            copies[-1]["sample_id"] = f"{row['sample_id']}-{n}"
    return pd.DataFrame(copies).reset_index(drop=True)


@pytest.mark.parametrize("task", ["captioning", "vqa"])
def test_streamed_generation_equals_opening_every_image_first(
    briefly_trained, shapes_test, broken_root, task, monkeypatch
):
    import vlmopt.streaming
    from vlmopt.data.images import open_image

    table = _shared_images(shapes_test)
    gen = generation_settings(max_new_tokens=6, num_beams=1)
    run = {"batch_size": 4, "generate_kwargs": gen, "max_error_fraction": 0.1, "progress": False}
    failed = 0
    for shard in range(2):
        reference = _reference(
            briefly_trained, table, broken_root, task, batch_size=4, gen=gen, shard=shard, n_shards=2
        )
        assert reference["prediction"].nunique() >= 4
        decoded = []

        def counting(root, rel, decoded=decoded):
            decoded.append(rel)
            return open_image(root, rel)

        with monkeypatch.context() as patch:
            patch.setattr(vlmopt.streaming, "open_image", counting)
            streamed = predict(briefly_trained, table, broken_root, task, shard=shard, n_shards=2, **run)
        pd.testing.assert_frame_equal(streamed, reference)
        # Rows that share an image and a batch decode it once.
        assert len(decoded) < len(reference)
        # Small chunks (images read by two worker processes in the first shard): the same predictions.
        chunked = predict(
            briefly_trained,
            table,
            broken_root,
            task,
            shard=shard,
            n_shards=2,
            chunk_rows=5,
            num_workers=2 - 2 * shard,
            **run,
        )
        pd.testing.assert_frame_equal(chunked, reference)
        failed += int(streamed["error"].notna().sum())
    assert failed == 3  # the broken image's three rows


@pytest.mark.parametrize(
    "family,task,task_settings",
    [
        ("clip", "classification", {"templates": ["a photo of a {}.", "{} image"]}),
        ("clip", "retrieval", {"k": 3}),
        ("blip-itm", "retrieval", {"k": 3}),
    ],
)
def test_streamed_similarity_equals_opening_every_image_first(
    shapes_texts, shapes_test, broken_root, family, task, task_settings
):
    import numpy as np

    loaded = load_model(f"tiny:{family}", texts=shapes_texts, seed=0)
    run = {"batch_size": 4, "generate_kwargs": {}, "max_error_fraction": 0.2, "progress": False}
    failed = 0
    for shard in range(2):
        reference = _reference(
            loaded,
            shapes_test,
            broken_root,
            task,
            batch_size=4,
            gen={},
            task_settings=task_settings,
            shard=shard,
            n_shards=2,
        )
        streamed = predict(
            loaded, shapes_test, broken_root, task, shard=shard, n_shards=2, task_settings=task_settings, **run
        )
        pd.testing.assert_frame_equal(streamed, reference)
        chunked = predict(
            loaded,
            shapes_test,
            broken_root,
            task,
            shard=shard,
            n_shards=2,
            task_settings=task_settings,
            chunk_rows=3,
            num_workers=2 - 2 * shard,
            **run,
        )
        score_columns = [c for c in reference.columns if c.startswith("scores")]
        pd.testing.assert_frame_equal(chunked.drop(columns=score_columns), reference.drop(columns=score_columns))
        for column in score_columns:
            readable = reference["error"].isna()
            assert chunked[column][~readable].isna().all()
            np.testing.assert_allclose(
                np.stack(chunked[column][readable]), np.stack(reference[column][readable]), rtol=0, atol=1e-6
            )
        failed += int(streamed["error"].notna().sum())
    assert failed == 1  # the broken image


def test_image_groups_decode_a_shared_image_once_and_record_unreadable_ones(shapes_test, broken_root, monkeypatch):
    import vlmopt.streaming
    from vlmopt.data.images import open_image
    from vlmopt.streaming import image_batches, image_groups

    decoded = []

    def counting(root, rel):
        decoded.append(rel)
        return open_image(root, rel)

    monkeypatch.setattr(vlmopt.streaming, "open_image", counting)
    [batch] = image_groups(shapes_test, broken_root, [[3, 0, 3, 5, 5]])
    assert batch.rows == [3, 0, 3, 5, 5]
    assert len(decoded) == 3
    assert batch.images[0] is batch.images[2] and batch.images[0].size == (64, 64)
    assert batch.images[3] is None and batch.images[4] is None
    assert (
        batch.errors[:3] == [None] * 3 and "cannot read image" in batch.errors[3] and batch.errors[3] == batch.errors[4]
    )
    batches = list(image_batches(shapes_test, broken_root, 5, rows=range(2, 14), num_workers=2))
    assert [b.rows for b in batches] == [list(range(2, 7)), list(range(7, 12)), [12, 13]]
    assert [e is not None for e in batches[0].errors] == [False, False, False, True, False]
