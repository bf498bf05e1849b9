"""Datasets published on the Hugging Face hub, read with the ``datasets`` library (https://huggingface.co/docs/datasets).

A source names its dataset by ``hub_id``, which is one of:

- a hub id (``owner/name``), read through the library's cache (``HF_HOME`` / ``HF_DATASETS_CACHE``):
  the first read downloads the dataset's files, later ones (also with ``HF_DATASETS_OFFLINE=1``)
  read the cache;
- a local folder holding the dataset's data files in the hub's layout (e.g.
  ``data/train-00000-of-00001.parquet``), as a clone of the hub repository has them; the library
  infers the splits from the file names;
- a local folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (it holds
  ``dataset_dict.json``, or ``state.json`` and ``dataset_info.json``). A single saved ``Dataset``
  is the split it was saved from (``Dataset.split``), or ``train`` when that is unknown.

Image columns (the library's ``Image`` feature: a record of the encoded file's ``bytes`` and its
original ``path``) are read without decoding, and each image's bytes are written unchanged to
``images/<split>/<name>`` under the dataset root: nothing is re-encoded, so the tables point at
the very files the publisher made. The file ending comes from the original path when it is an
image ending, otherwise from the format Pillow recognises in the bytes, otherwise ``.png``.

``datasets`` is imported only when a hub dataset is read, so the rest of the package works
without it.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from vlmopt.data.local_folders import IMAGE_SUFFIXES

__all__ = [
    "checked_splits",
    "has_image",
    "image_suffix",
    "load_hub_dataset",
    "remove_stale_images",
    "require_columns",
    "require_split",
    "split_table",
    "write_images",
]

log = logging.getLogger(__name__)

#: Pillow's format name -> the file ending an image of that format is written with.
_FORMAT_SUFFIXES = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tif",
    "WEBP": ".webp",
}
_SUFFIXES = IMAGE_SUFFIXES | {".gif"}


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "reading a dataset from the Hugging Face hub needs the 'datasets' library, which is not installed "
            "(pip install datasets)"
        ) from err
    return datasets


def _is_saved_folder(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def load_hub_dataset(hub_id: str | Path) -> dict[str, Any]:
    """Split name -> ``datasets.Dataset`` of the hub dataset or local folder ``hub_id`` (see the module docs)."""
    datasets = _import_datasets()
    hub_id = str(hub_id)
    folder = Path(hub_id).expanduser()
    if folder.is_dir() and _is_saved_folder(folder):
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.Dataset):
            split = str(loaded.split) if loaded.split is not None else "train"
            return {split: loaded}
        return dict(loaded)
    where = f"local folder {str(folder)!r}" if folder.is_dir() else f"hub dataset {hub_id!r}"
    try:
        loaded = datasets.load_dataset(str(folder) if folder.is_dir() else hub_id)
    except Exception as err:
        hint = (
            ""
            if folder.is_dir()
            else " (a hub id is read through the library's cache, which must already hold it when "
            "HF_DATASETS_OFFLINE=1 is set; a local folder must exist)"
        )
        raise ValueError(f"could not read the {where}{hint}: {type(err).__name__}: {err}") from err
    return dict(loaded)


def require_split(splits: dict[str, Any], names: str | Sequence[str], hub_id: str | Path) -> Any:
    """The split called one of ``names`` (the first found); otherwise an error naming what exists."""
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name in splits:
            return splits[name]
    wanted = repr(names[0]) if len(names) == 1 else " or ".join(repr(n) for n in names)
    raise ValueError(f"dataset {str(hub_id)!r} has no split {wanted}; its splits are {sorted(splits)}")


def require_columns(dataset: Any, columns: Iterable[str], hub_id: str | Path, split: str) -> None:
    """Raise naming the missing columns and the ones the split has, unless it has all of ``columns``."""
    have = list(dataset.column_names)
    missing = [c for c in columns if c not in have]
    if missing:
        raise ValueError(f"dataset {str(hub_id)!r}, split {split!r}, lacks column(s) {missing}; its columns are {have}")


def split_table(dataset: Any, columns: Sequence[str]) -> pd.DataFrame:
    """``columns`` of every row as a DataFrame (index = row position), read without touching other columns."""
    rows = dataset.select_columns(list(columns)).to_pandas()
    return rows.reset_index(drop=True)


def has_image(dataset: Any, column: str) -> np.ndarray:
    """Per row, whether the image column holds an image (bytes or a path), read without decoding."""
    table = dataset.select_columns([column]).with_format("arrow")[:]
    values = table.column(column).combine_chunks()
    if len(values) == 0:
        return np.zeros(0, dtype=bool)
    present = ~values.is_null().to_numpy(zero_copy_only=False)
    fields = [values.type.field(i).name for i in range(values.type.num_fields)]
    if not {"bytes", "path"} <= set(fields):
        raise ValueError(f"column {column!r} is not an image column (its values are {values.type})")
    data = values.field("bytes").is_valid().to_numpy(zero_copy_only=False)
    path = values.field("path").is_valid().to_numpy(zero_copy_only=False)
    return present & (data | path)


def image_suffix(data: bytes, *names: str | None) -> str:
    """The file ending of an image: the first of ``names`` with an image ending, else the format Pillow sees."""
    for name in names:
        if name:
            suffix = PurePosixPath(str(name).replace("\\", "/")).suffix.lower()
            if suffix in _SUFFIXES:
                return suffix
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return _FORMAT_SUFFIXES.get(str(image.format), ".png")
    except (UnidentifiedImageError, OSError, ValueError):
        return ".png"


def write_images(
    dataset: Any,
    column: str,
    rows: Sequence[int],
    stems: Sequence[str],
    root: str | Path,
    split: str,
    *,
    hub_id: str | Path,
    extra_names: Sequence[str | None] | None = None,
    batch_size: int = 64,
) -> list[str]:
    """Write the image of each row in ``rows`` to ``images/<split>/<stem><ending>``; the paths relative to ``root``.

    Bytes are written as stored (an image given only by a path is copied from that file). A file
    already holding the same bytes is left alone, so a rerun writes nothing. ``extra_names``
    gives, per row, another name whose ending is used when the image's own path has none.
    """
    datasets = _import_datasets()
    if len(rows) != len(stems):
        raise ValueError(f"{len(rows)} rows but {len(stems)} image names")
    root = Path(root)
    folder = root / "images" / split
    subset = dataset.select_columns([column]).select(list(rows))
    subset = subset.cast_column(column, datasets.Image(decode=False))
    out: list[str] = []
    seen: set[str] = set()
    pos = 0
    for batch in subset.iter(batch_size=batch_size):
        for value in batch[column]:
            row, stem = rows[pos], stems[pos]
            extra = extra_names[pos] if extra_names is not None else None
            pos += 1
            data = _image_bytes(value, hub_id, split, row, column)
            name = f"{stem}{image_suffix(data, (value or {}).get('path'), extra)}"
            if name in seen:
                raise ValueError(f"dataset {str(hub_id)!r}, split {split!r}: two images would be written as {name!r}")
            seen.add(name)
            target = folder / name
            if not (target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data):
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp")
                tmp.write_bytes(data)
                tmp.replace(target)
            out.append(f"images/{split}/{name}")
    return out


def remove_stale_images(root: str | Path, keep: Iterable[str]) -> int:
    """Delete files under ``<root>/images`` that are not in ``keep`` (paths relative to ``root``); how many."""
    root = Path(root)
    keep_set = {(root / rel).resolve() for rel in keep}
    removed = 0
    images = root / "images"
    if images.is_dir():
        for path in sorted(images.rglob("*")):
            if path.is_file() and path.resolve() not in keep_set:
                path.unlink()
                removed += 1
    return removed


def _image_bytes(value: dict | None, hub_id: str | Path, split: str, row: int, column: str) -> bytes:
    if value is not None and value.get("bytes") is not None:
        return bytes(value["bytes"])
    path = (value or {}).get("path")
    if path and Path(path).is_file():
        return Path(path).read_bytes()
    where = f"dataset {str(hub_id)!r}, split {split!r}, row {row}, column {column!r}"
    if path:
        raise FileNotFoundError(f"{where}: the image has no bytes and its path {path!r} is not a file")
    raise ValueError(f"{where}: the row has no image")


def checked_splits(
    hub_id: str, splits: dict[str, Sequence[str]], columns: Iterable[str]
) -> Iterator[tuple[str, str, Any]]:
    """For each of our splits: its name, the hub split read for it, and that split, checked for ``columns``.

    ``splits`` maps our split name to the hub names it may have (the first found is read).
    """
    loaded = load_hub_dataset(hub_id)
    for split, names in splits.items():
        dataset = require_split(loaded, names, hub_id)
        hub_split = next(n for n in names if n in loaded)
        require_columns(dataset, columns, hub_id, hub_split)
        yield split, hub_split, dataset
