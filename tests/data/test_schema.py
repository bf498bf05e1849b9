"""The dataset table schema: what it accepts, what it rejects (by name), and reproducible writes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmopt.data.schema import TASK_COLUMNS, dataset_texts, read_split, validate_dataset_table, write_table

ALL_TASKS = ("captioning", "vqa", "classification", "retrieval")


def _table(n: int = 4) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sample_id": [f"s-{i}" for i in range(n)],
            "image": [f"images/s-{i}.png" for i in range(n)],
            "references": [[f"caption {i} one", f"caption {i} two"] for i in range(n)],
            "question": ["what is it?"] * n,
            "answers": [["a"] * 10 for _ in range(n)],
            "answer_type": ["other"] * n,
            "label": np.arange(n, dtype=np.int64) % 2,
            "label_name": [("real", "generated")[i % 2] for i in range(n)],
            "captions": [[f"text {i}"] for i in range(n)],
            "question_type": ["color"] * n,
        }
    )


def test_task_columns_have_the_contract_types():
    assert TASK_COLUMNS["captioning"] == {"references": pa.list_(pa.string())}
    assert TASK_COLUMNS["vqa"] == {
        "question": pa.string(),
        "answers": pa.list_(pa.string()),
        "answer_type": pa.string(),
    }
    assert TASK_COLUMNS["classification"] == {"label": pa.int64(), "label_name": pa.string()}
    assert TASK_COLUMNS["retrieval"] == {"captions": pa.list_(pa.string())}


def test_valid_table_passes_for_every_task():
    validate_dataset_table(_table(), ALL_TASKS)


@pytest.mark.parametrize(
    ("column", "task"),
    [
        ("references", "captioning"),
        ("answers", "vqa"),
        ("label", "classification"),
        ("captions", "retrieval"),
    ],
)
def test_missing_task_column_is_named(column, task):
    df = _table().drop(columns=[column])
    with pytest.raises(ValueError, match=rf"missing column\(s\) '{column}' \(needed by {task}\)"):
        validate_dataset_table(df, [task])
    validate_dataset_table(df, [t for t in ALL_TASKS if t != task])  # other tasks don't need it


def test_missing_sample_id_is_named_even_without_tasks():
    with pytest.raises(ValueError, match="'sample_id'"):
        validate_dataset_table(_table().drop(columns=["sample_id"]))


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['segmentation'\].*captioning"):
        validate_dataset_table(_table(), ["segmentation"])


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("label", ["0", "1", "0", "1"], r"'label' must hold integers .*got dtype"),
        ("label", [0.0, 1.5, 0.0, 1.0], r"'label' must hold integers"),
        ("references", ["one caption", "b", "c", "d"], r"'references' must hold .*row 0 has str"),
        ("references", [["ok caption"], [], ["x"], ["y"]], r"'references' .*row 1 has an empty list"),
        ("answers", [["a"], ["b", 3], ["c"], ["d"]], r"'answers' .*row 1 has \['b', 3\]"),
        ("question", ["q?", None, "q?", "q?"], r"'question' must hold non-empty strings.*row 1 has null"),
        ("question", ["q?", "q?", "", "q?"], r"'question' .*row 2 has str ''"),
        ("sample_id", [1, 2, 3, 4], r"'sample_id' must hold non-empty strings.*row 0 has int"),
    ],
)
def test_wrong_values_are_named(column, values, message):
    df = _table()
    df[column] = pd.Series(values, dtype=object) if column != "label" else values
    with pytest.raises(ValueError, match=message):
        validate_dataset_table(df, ALL_TASKS)


def test_duplicate_sample_id_is_rejected():
    df = _table()
    df.loc[2, "sample_id"] = "s-0"
    with pytest.raises(ValueError, match=r"'sample_id' has 1 duplicate value\(s\), e.g. \['s-0'\]"):
        validate_dataset_table(df)


@pytest.mark.parametrize("bad", ["/abs/x.png", "../outside.png", "images/../../x.png", "C:\\x.png"])
def test_image_paths_must_stay_inside_the_root(bad):
    df = _table()
    df.loc[1, "image"] = bad
    with pytest.raises(ValueError, match="'image' must hold paths relative to the dataset root"):
        validate_dataset_table(df)


def test_label_name_must_follow_label():
    df = _table()
    df.loc[2, "label_name"] = "generated"  # label 0 now has two names
    with pytest.raises(ValueError, match=r"'label_name' is not a function of 'label' \(labels \[0\]\)"):
        validate_dataset_table(df, ["classification"])


def test_write_is_deterministic_typed_and_in_canonical_order(tmp_path):
    df = _table()
    df["extra_b"] = [1, 2, 3, 4]
    df["extra_a"] = ["x", "y", "z", "w"]
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_table(df, a, ALL_TASKS)
    # Same rows with shuffled columns and a non-default index: same bytes.
    shuffled = df[list(reversed(df.columns))].set_axis([10, 11, 12, 13])
    write_table(shuffled, b, ALL_TASKS)
    assert a.read_bytes() == b.read_bytes()

    schema = pq.read_schema(a)
    assert schema.names == [
        "sample_id",
        "image",
        "references",
        "question",
        "answers",
        "answer_type",
        "label",
        "label_name",
        "captions",
        "question_type",
        "extra_a",
        "extra_b",
    ]
    assert schema.field("references").type == pa.list_(pa.string())
    assert schema.field("label").type == pa.int64()
    assert b"pandas" not in (schema.metadata or {})
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_round_trip_through_read_split(tmp_path):
    df = _table()
    write_table(df, tmp_path / "test.parquet", ALL_TASKS)
    back = read_split(tmp_path, "test", ALL_TASKS)
    assert list(back["sample_id"]) == list(df["sample_id"])
    assert [list(r) for r in back["references"]] == list(df["references"])
    assert back["label"].dtype == np.int64
    assert isinstance(back.index, pd.RangeIndex)
    # What was read validates again, and rewriting it gives the same bytes.
    write_table(back, tmp_path / "again.parquet", ALL_TASKS)
    assert (tmp_path / "again.parquet").read_bytes() == (tmp_path / "test.parquet").read_bytes()


def test_invalid_table_leaves_the_existing_file_untouched(tmp_path):
    path = tmp_path / "train.parquet"
    write_table(_table(), path)
    before = path.read_bytes()
    bad = _table()
    bad.loc[0, "sample_id"] = "s-1"
    with pytest.raises(ValueError, match="duplicate"):
        write_table(bad, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.parquet"]


def test_read_split_names_the_missing_path(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=rf"split 'val' not found: expected the table at {tmp_path}/val.parquet"
    ):
        read_split(tmp_path, "val")


def test_read_split_rejects_a_table_missing_task_columns(tmp_path):
    write_table(_table().drop(columns=["answers"]), tmp_path / "test.parquet")
    with pytest.raises(ValueError, match=r"test.parquet: .*'answers' \(needed by vqa\)"):
        read_split(tmp_path, "test", ["vqa"])


def test_empty_table_is_valid_and_writable(tmp_path):
    write_table(_table().iloc[:0], tmp_path / "val.parquet", ALL_TASKS)
    assert len(read_split(tmp_path, "val", ALL_TASKS)) == 0


def test_dataset_texts_collects_each_text_once_in_order():
    df = _table(2)
    texts = dataset_texts(df)
    assert texts == [
        "caption 0 one",
        "caption 0 two",
        "caption 1 one",
        "caption 1 two",
        "text 0",
        "text 1",
        "what is it?",
        "a",
    ]
    assert dataset_texts(df[["sample_id", "image"]]) == []
