"""Shared source helpers: seeded subsets and splits written whole, empty ones typed."""

from __future__ import annotations

import pandas as pd
import pytest

from vlmopt.data.sources import deterministic_subset, write_splits


def test_subset_is_seeded_and_keeps_the_original_order():
    df = pd.DataFrame({"sample_id": [f"s{i}" for i in range(50)]})
    a, b = deterministic_subset(df, 10, seed=3), deterministic_subset(df, 10, seed=3)
    assert list(a["sample_id"]) == list(b["sample_id"]) and len(a) == 10
    assert list(a.index) == list(range(10))
    assert [int(s[1:]) for s in a["sample_id"]] == sorted(int(s[1:]) for s in a["sample_id"])
    assert list(deterministic_subset(df, 10, seed=4)["sample_id"]) != list(a["sample_id"])
    assert len(deterministic_subset(df, None)) == 50 and len(deterministic_subset(df, 500)) == 50
    with pytest.raises(ValueError, match="positive integer"):
        deterministic_subset(df, 0)


def test_missing_splits_are_written_empty_with_the_schema_types(tmp_path):
    columns = ("sample_id", "image", "label", "label_name")
    test = pd.DataFrame({"sample_id": ["a"], "image": ["images/a.png"], "label": [3], "label_name": ["cat"]})
    paths = write_splits(tmp_path, {"test": test}, ("classification",), columns)
    assert sorted(paths) == ["test", "train", "val"]
    train = pd.read_parquet(paths["train"])
    assert len(train) == 0 and list(train.columns) == list(columns) and str(train["label"].dtype) == "int64"
    with pytest.raises(ValueError, match="unknown split"):
        write_splits(tmp_path, {"dev": test}, ("classification",), columns)
