"""The dataset table: one schema, checked on write, written byte-for-byte reproducibly.

A dataset split is ``<root>/<split>.parquet`` with one row per sample: ``sample_id``, ``image``
(a path relative to ``<root>``) and the columns of each task the dataset serves. Checking the table
when it is written means every later stage can trust it, and writing it deterministically means
a regenerated dataset has the same hash, so Snakemake-style reruns stop at the data stage.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "BASE_COLUMNS",
    "OPTIONAL_COLUMNS",
    "SPLITS",
    "TASK_COLUMNS",
    "TEXT_COLUMNS",
    "column_order",
    "dataset_texts",
    "read_split",
    "require_rows",
    "validate_dataset_table",
    "write_table",
]

#: The splits of every dataset, one ``<split>.parquet`` each (an empty table where a source has none).
SPLITS: tuple[str, ...] = ("train", "val", "test")

_STR = pa.string()
_STR_LIST = pa.list_(pa.string())

#: Columns every dataset table has.
BASE_COLUMNS: dict[str, pa.DataType] = {"sample_id": _STR, "image": _STR}

#: Columns each task needs, with their Arrow types.
TASK_COLUMNS: dict[str, dict[str, pa.DataType]] = {
    "captioning": {"references": _STR_LIST},
    "vqa": {"question": _STR, "answers": _STR_LIST, "answer_type": _STR},
    "classification": {"label": pa.int64(), "label_name": _STR},
    "retrieval": {"captions": _STR_LIST},
    # Labels 0 real / 1 generated; an optional ``text`` (data.labeling) is the training target.
    "real_vs_generated": {"label": pa.int64(), "label_name": _STR},
}

#: Known columns no task requires; typed (and checked) whenever present. ``choices`` and
#: ``answer_index`` are a multiple-choice question's options and the correct one's position.
OPTIONAL_COLUMNS: dict[str, pa.DataType] = {
    "question_type": _STR,
    "text": _STR,
    "choices": _STR_LIST,
    "answer_index": pa.int64(),
}

#: Text columns a tokenizer for the dataset's vocabulary is trained on.
TEXT_COLUMNS: tuple[str, ...] = ("references", "captions", "question", "answers", "text")

_KNOWN: dict[str, pa.DataType] = {
    **BASE_COLUMNS,
    **{col: typ for cols in TASK_COLUMNS.values() for col, typ in cols.items()},
    **OPTIONAL_COLUMNS,
}


def column_order(columns: Iterable[str]) -> list[str]:
    """Canonical column order: known columns as listed in this module, then any others by name."""
    columns = list(columns)
    known = [c for c in _KNOWN if c in columns]
    return known + sorted(c for c in columns if c not in _KNOWN)


def validate_dataset_table(df: pd.DataFrame, tasks: Iterable[str] = ()) -> None:
    """Check ``df`` against the dataset schema and the columns ``tasks`` need.

    Raises ``ValueError`` naming the first problem found: an unknown task, a missing column, a
    value of the wrong type, a null, a duplicate ``sample_id``, an absolute or escaping image
    path, an empty text or reference list, a ``label`` with more than one ``label_name``, or an
    ``answer_index`` outside its row's ``choices``.
    """
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"a dataset table must be a pandas DataFrame, got {type(df).__name__}")
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASK_COLUMNS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {sorted(TASK_COLUMNS)}")
    if df.columns.duplicated().any():
        raise ValueError(f"duplicate column names: {sorted(set(df.columns[df.columns.duplicated()]))}")
    required = {**BASE_COLUMNS, **{c: t for task in tasks for c, t in TASK_COLUMNS[task].items()}}
    missing = [c for c in required if c not in df.columns]
    if missing:
        needed_by = {c: [t for t in tasks if c in TASK_COLUMNS[t]] or ["every dataset"] for c in missing}
        detail = ", ".join(f"{c!r} (needed by {', '.join(needed_by[c])})" for c in missing)
        raise ValueError(f"dataset table is missing column(s) {detail}; it has {list(df.columns)}")

    for col, typ in _KNOWN.items():
        if col not in df.columns:
            continue
        if typ == _STR:
            _check_strings(col, df[col])
        elif typ == _STR_LIST:
            _check_string_lists(col, df[col])
        elif typ == pa.int64():
            _check_integers(col, df[col])

    ids = df["sample_id"]
    if ids.duplicated().any():
        dupes = sorted(set(ids[ids.duplicated()]))
        raise ValueError(f"column 'sample_id' has {len(dupes)} duplicate value(s), e.g. {dupes[:3]}")
    for value in df["image"]:
        path = PurePosixPath(value.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or (len(value) > 1 and value[1] == ":"):
            raise ValueError(f"column 'image' must hold paths relative to the dataset root, got {value!r}")
    if "answer_index" in df.columns and "choices" in df.columns:
        for pos, (index, choices) in enumerate(zip(df["answer_index"], df["choices"], strict=True)):
            if not 0 <= index < len(choices):
                raise ValueError(
                    f"column 'answer_index' must index into 'choices'; row {pos} has {index} "
                    f"for {len(choices)} choice(s)"
                )
    if "label" in df.columns and "label_name" in df.columns and len(df):
        names = df.groupby("label", sort=True)["label_name"].nunique()
        if (names > 1).any():
            raise ValueError(
                f"column 'label_name' is not a function of 'label' (labels {list(names[names > 1].index)})"
            )


def write_table(df: pd.DataFrame, path: str | Path, tasks: Iterable[str] = ()) -> Path:
    """Validate ``df`` and write it to ``path`` as Parquet, deterministically and atomically.

    Columns are put in canonical order and typed as the schema says; the pandas index and pandas
    metadata are left out, so two writes of the same rows give identical bytes. The file appears
    under its final name only once complete (temp file in the same folder, then ``os.replace``).
    """
    validate_dataset_table(df, tasks)
    path = Path(path)
    arrays, fields = [], []
    for col in column_order(df.columns):
        typ = _KNOWN.get(col)
        values = df[col]
        if typ == _STR_LIST:
            array = pa.array([[str(s) for s in v] for v in values], type=typ)
        elif typ == pa.int64():
            array = pa.array(values.to_numpy(dtype=np.int64), type=typ)
        elif typ is not None:
            array = pa.array(values.tolist(), type=typ)
        else:
            array = pa.array(values, from_pandas=True)
        arrays.append(array)
        fields.append(pa.field(col, array.type))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    _atomic_write_parquet(table, path)
    return path


def read_split(root: str | Path, split: str, tasks: Iterable[str] = ()) -> pd.DataFrame:
    """Read ``<root>/<split>.parquet`` and check it serves ``tasks``; a missing file names the path."""
    path = Path(root) / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"dataset split {split!r} not found: expected the table at {path}")
    df = pd.read_parquet(path)
    try:
        validate_dataset_table(df, tasks)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return df


def require_rows(table: str | Path, purpose: str) -> int:
    """The number of rows of the split table at ``table``; an error when it has none.

    Checked by the jobs that read a split (inference, profiling, finetuning, calibration) before
    they load a model: a source writes an empty table for a split it does not have, and an empty
    split would otherwise run through inference and fail only in scoring. The message names the
    dataset, the split, what reads it (``purpose``, e.g. ``"inference.split"``) and the splits of
    that dataset that have rows. Reads only the Parquet footers.
    """
    path = Path(table)
    rows = pq.read_metadata(path).num_rows
    if rows:
        return rows
    others = []
    for split in SPLITS:
        sibling = path.with_name(f"{split}.parquet")
        if sibling != path and sibling.is_file():
            n = pq.read_metadata(sibling).num_rows
            if n:
                others.append(f"{split} ({n} rows)")
    raise ValueError(
        f"dataset {path.parent.name!r} has no rows in split {path.stem!r}, which {purpose} reads; "
        f"its splits with rows: {', '.join(others) or 'none'}"
    )


def dataset_texts(df: pd.DataFrame) -> list[str]:
    """Every caption, question and answer in ``df``, each once, in first-seen order.

    These are the texts an offline tokenizer is trained on so that it covers the dataset's vocabulary.
    """
    seen: dict[str, None] = {}
    for col in TEXT_COLUMNS:
        if col not in df.columns:
            continue
        for value in df[col]:
            if isinstance(value, str):
                seen.setdefault(value, None)
            elif value is not None and not _is_null(value):
                for text in value:
                    seen.setdefault(str(text), None)
    return list(seen)


def _atomic_write_parquet(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd", write_statistics=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_null(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA


def _bad_row(col: str, values: pd.Series, pos: int, expected: str) -> ValueError:
    value = values.iloc[pos]
    got = "null" if _is_null(value) else f"{type(value).__name__} {value!r}"
    return ValueError(f"column {col!r} must hold {expected}; row {pos} has {got}")


def _check_strings(col: str, values: pd.Series) -> None:
    for pos, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise _bad_row(col, values, pos, "non-empty strings (Arrow string)")


def _check_string_lists(col: str, values: pd.Series) -> None:
    expected = "non-empty lists of non-empty strings (Arrow list<string>)"
    for pos, value in enumerate(values):
        if isinstance(value, str) or not isinstance(value, list | tuple | np.ndarray):
            raise _bad_row(col, values, pos, expected)
        if len(value) == 0:
            raise ValueError(f"column {col!r} must hold {expected}; row {pos} has an empty list")
        if not all(isinstance(s, str) and s.strip() for s in value):
            raise ValueError(f"column {col!r} must hold {expected}; row {pos} has {list(value)!r}")


def _check_integers(col: str, values: pd.Series) -> None:
    if not pd.api.types.is_integer_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype):
        raise ValueError(f"column {col!r} must hold integers (Arrow int64), got dtype {values.dtype}")
    if values.isna().any():
        raise _bad_row(col, values, int(np.flatnonzero(values.isna().to_numpy())[0]), "integers without nulls")
