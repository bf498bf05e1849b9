from __future__ import annotations

import pandas as pd
import pytest

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
