"""Shared pieces of the real dataset sources: pinned files, fetching, subsets, and writing the splits.

A real source pins its files (:class:`RemoteFile`: URL and, where the publisher gives one, a
checksum; where it gives none, a size in bytes can be pinned instead), fetches them into a raw
folder that survives reruns (so an interrupted download resumes), converts the published layout
into the canonical tables (:mod:`vlmopt.data.schema`), and writes all three splits: a split the
dataset does not have is written empty, so every dataset offers the same three files to the
workflow. ``mirror`` replaces every file's host with a mirror (or a test
server) that serves the same file names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from vlmopt.data.download import download
from vlmopt.data.schema import _KNOWN, SPLITS, write_table

__all__ = ["RemoteFile", "deterministic_subset", "fetch", "write_splits"]


@dataclass(frozen=True)
class RemoteFile:
    """One published file: saved as ``name`` in the raw folder, checked against its checksum and size.

    ``size`` (bytes) pins the file's length where the publisher gives no checksum; leave it unset
    unless the value was taken from the published file itself.
    """

    name: str
    url: str
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None


def fetch(
    files: Iterable[RemoteFile], raw_dir: str | Path, *, mirror: str | None = None, progress: bool = True
) -> dict[str, Path]:
    """Download each file into ``raw_dir`` (resuming, verifying checksum, size and archives); file name -> path."""
    out = {}
    for file in files:
        url = f"{mirror.rstrip('/')}/{file.name}" if mirror else file.url
        out[file.name] = download(
            url, Path(raw_dir) / file.name, sha256=file.sha256, md5=file.md5, size=file.size, progress=progress
        )
    return out


def deterministic_subset(df: pd.DataFrame, max_samples: int | None, *, seed: int = 0) -> pd.DataFrame:
    """At most ``max_samples`` rows drawn with a seeded permutation, kept in their original order."""
    if max_samples is None or len(df) <= max_samples:
        return df.reset_index(drop=True)
    if isinstance(max_samples, bool) or int(max_samples) < 1:
        raise ValueError(f"max_samples must be a positive integer, got {max_samples!r}")
    keep = np.sort(np.random.default_rng(seed).permutation(len(df))[: int(max_samples)])
    return df.iloc[keep].reset_index(drop=True)


def write_splits(
    root: str | Path, tables: dict[str, pd.DataFrame], tasks: tuple[str, ...], columns: Iterable[str]
) -> dict[str, Path]:
    """Write every split's table under ``root`` (an empty table with ``columns`` for a missing split)."""
    root = Path(root)
    unknown = set(tables) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; splits are {list(SPLITS)}")
    empty = pd.DataFrame({c: pd.Series(dtype="int64" if _KNOWN.get(c) == pa.int64() else object) for c in columns})
    return {split: write_table(tables.get(split, empty), root / f"{split}.parquet", tasks=tasks) for split in SPLITS}
