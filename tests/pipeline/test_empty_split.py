"""An empty split is refused by the jobs that read it, before a model is loaded."""

from __future__ import annotations

import pandas as pd
import pytest

from vlmopt.data.schema import require_rows
from vlmopt.pipeline import predict_shard, profile_variant


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "shapes"
    root.mkdir()
    rows = pd.DataFrame({"sample_id": ["a", "b", "c"], "image": ["images/a.png"] * 3})
    rows.to_parquet(root / "train.parquet")
    rows.iloc[:2].to_parquet(root / "test.parquet")
    rows.iloc[:0].to_parquet(root / "val.parquet")
    return root


def test_require_rows_counts_and_names_the_splits_that_have_rows(dataset):
    assert require_rows(dataset / "train.parquet", "finetuning") == 3
    with pytest.raises(
        ValueError,
        match=r"dataset 'shapes' has no rows in split 'val', which inference \(inference.split\) reads; "
        r"its splits with rows: train \(3 rows\), test \(2 rows\)",
    ):
        require_rows(dataset / "val.parquet", "inference (inference.split)")


def test_inference_on_an_empty_split_stops_before_loading_the_model(dataset, tmp_path):
    out = tmp_path / "shard.parquet"
    # The model folder does not exist: the split is checked first, so that is not what fails.
    with pytest.raises(ValueError, match="no rows in split 'val'"):
        predict_shard(
            tmp_path / "no-model",
            dataset / "val.parquet",
            dataset,
            out,
            task="captioning",
            shard="1-of-1",
            settings={"batch_size": 2},
        )
    assert not out.exists()


def test_profiling_on_an_empty_split_stops_before_loading_the_model(dataset, tmp_path):
    with pytest.raises(ValueError, match=r"no rows in split 'val', which profiling of captioning"):
        profile_variant(
            tmp_path / "no-model",
            {"captioning": {"table": str(dataset / "val.parquet"), "root": str(dataset), "dataset": "shapes"}},
            tmp_path / "profile.parquet",
            keys={"model": "m", "ft": "none", "variant": "baseline"},
            settings={},
            chain={},
        )


def test_finetuning_and_calibration_on_an_empty_split_stop_before_loading_the_model(dataset, tmp_path):
    from vlmopt.pipeline import compress_model, finetune_model

    with pytest.raises(ValueError, match=r"no rows in split 'val', which finetuning reads"):
        finetune_model(
            tmp_path / "no-model",
            tmp_path / "out",
            settings={"method": "full", "dataset": "shapes"},
            train_table=dataset / "val.parquet",
            dataset_root=dataset,
            checkpoint_dir=tmp_path / "ckpt",
        )
    step = {
        "method": "gptq",
        "bits": 4,
        "part": "language",
        "calibration": {"dataset": "shapes", "split": "val", "n": 2},
    }
    with pytest.raises(ValueError, match=r"no rows in split 'val', which step 0 \(gptq\) reads"):
        compress_model(tmp_path / "no-model", tmp_path / "variant", steps=[step], data_root=dataset.parent)
    assert not (tmp_path / "out").exists() and not (tmp_path / "variant").exists()
