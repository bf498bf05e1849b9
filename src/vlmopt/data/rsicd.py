"""RSICD, remote-sensing image captioning (Lu et al. 2017, https://arxiv.org/abs/1712.07835), from the Hugging Face hub.

The default ``hub_id`` is ``arampacha/rsicd`` (https://huggingface.co/datasets/arampacha/rsicd),
read with :mod:`vlmopt.data.hub` (a hub id, a local copy in the same layout, or a
``save_to_disk`` folder). Its published layout, as listed on the hub (files view of ``data/`` and
``dataset_infos.json``, commit 820466c, April 2022): three parquet files
``data/train-00000-of-00001.parquet``, ``data/valid-00000-of-00001.parquet`` and
``data/test-00000-of-00001.parquet``, i.e. the splits ``train`` (8,734 images), ``valid`` (1,094)
and ``test`` (1,093), with the features ``filename`` (string, the image's file name in the
original release, e.g. ``airport_1.jpg``), ``captions`` (a sequence of strings, five per image)
and ``image`` (an ``Image``: the encoded JPEG's bytes and its path).

Splits: ``train`` from ``train``, ``val`` from ``valid`` (``validation`` is read too, the name the
library gives that split when it infers splits from other file names), ``test`` from ``test``.
Every row has the image's captions -- in published order, whitespace collapsed, blank ones left
out -- as both the captioning references and the retrieval captions; an image left without
captions is left out. Rows keep the hub's order. ``sample_id`` is ``filename``; the image's bytes
are written unchanged to ``images/<split>/<filename without ending><ending>`` (the ending of the
image's stored path, else of ``filename``, else the format found in the bytes).
``max_samples`` keeps a seeded subset of at most that many images in each split (rows in hub
order), and only those images are written.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

import pandas as pd

from vlmopt.data.hub import (
    checked_splits,
    remove_stale_images,
    split_table,
    write_images,
)
from vlmopt.data.sources import deterministic_subset, write_splits

__all__ = ["HUB_ID", "HUB_SPLITS", "make_rsicd", "rsicd_table"]

log = logging.getLogger(__name__)

HUB_ID = "arampacha/rsicd"
#: Our split -> the hub split names it is read from (the first that exists).
HUB_SPLITS = {"train": ("train",), "val": ("valid", "validation"), "test": ("test",)}
HUB_COLUMNS = ("filename", "captions", "image")
TASKS = ("captioning", "retrieval")
COLUMNS = ("sample_id", "image", "references", "captions")


def _captions(value: object) -> list[str]:
    if value is None or isinstance(value, str):
        texts = [] if value is None else [value]
    else:
        texts = list(value)
    texts = [" ".join(str(t).split()) for t in texts if t is not None]
    return [t for t in texts if t]


def rsicd_table(rows: pd.DataFrame, hub_id: str, split: str) -> pd.DataFrame:
    """Table rows (``filename``/``captions`` per hub row) with the hub row position in ``_row``."""
    out = []
    for pos, (filename, captions) in enumerate(zip(rows["filename"], rows["captions"], strict=True)):
        if not isinstance(filename, str) or not filename.strip():
            raise ValueError(f"dataset {hub_id!r}, split {split!r}, row {pos}: 'filename' is empty ({filename!r})")
        texts = _captions(captions)
        if texts:
            out.append({"_row": pos, "sample_id": filename, "references": texts, "captions": list(texts)})
    return pd.DataFrame(out, columns=["_row", "sample_id", "references", "captions"])


def make_rsicd(
    root: str | Path, *, seed: int = 0, hub_id: str = HUB_ID, max_samples: int | None = None
) -> dict[str, Path]:
    """Read RSICD from ``hub_id`` and write its train/val/test tables and images under ``root``."""
    root = Path(root)
    hub_id = str(hub_id)
    tables: dict[str, pd.DataFrame] = {}
    written: list[str] = []
    for split, hub_split, dataset in checked_splits(hub_id, HUB_SPLITS, HUB_COLUMNS):
        table = rsicd_table(split_table(dataset, ["filename", "captions"]), hub_id, hub_split)
        table = deterministic_subset(table, max_samples, seed=seed)
        rows = [int(r) for r in table["_row"]]
        filenames = list(table["sample_id"])
        table["image"] = write_images(
            dataset,
            "image",
            rows,
            [PurePosixPath(f.replace("\\", "/")).stem for f in filenames],
            root,
            split,
            hub_id=hub_id,
            extra_names=filenames,
        )
        written.extend(table["image"])
        tables[split] = table.drop(columns="_row")[list(COLUMNS)]
        log.info("rsicd %s: %d images from %s split %r", split, len(table), hub_id, hub_split)
    remove_stale_images(root, written)
    return write_splits(root, tables, TASKS, COLUMNS)
