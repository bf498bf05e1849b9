"""Datasets read from a local folder (GenImage, ImageNet): listing its images and copying them under the root.

Some datasets are not downloadable from a fixed URL (cloud drives, registration walls), so a
study names a local copy with the ``path`` setting. The images are copied (not linked) under
``<root>/images``, so a dataset folder stays valid when the local copy moves or is deleted, like
every other dataset. A rerun copies only images that are missing or differ in size or modification
time, and removes images of an earlier, larger run.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

__all__ = ["IMAGE_SUFFIXES", "image_files", "require_folder", "sync_images", "typed_empty"]

#: File name endings (case-insensitive) taken as images; anything else in a class folder is ignored.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


def require_folder(path: str | Path | None, dataset: str, layout: str) -> Path:
    """``path`` as a folder that exists; otherwise an error naming the ``path`` setting and ``layout``."""
    if path is None or str(path).strip() == "":
        raise ValueError(f"dataset {dataset!r} needs the setting 'path': a local folder laid out as {layout}")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset {dataset!r}: path {str(folder)!r} is not a folder (expected {layout})")
    return folder


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` by name order; hidden files and other endings are left out."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def sync_images(pairs: Iterable[tuple[Path, Path]], images_dir: Path) -> int:
    """Copy each ``(source, target)`` whose target is missing or stale; drop other files under ``images_dir``.

    Returns the number of files copied. Refuses a source inside ``images_dir`` (the local copy and
    the dataset folder must not overlap, or removing stale files could delete source images).
    """
    images_dir = images_dir.resolve()
    keep: set[Path] = set()
    copied = 0
    for source, target in pairs:
        if images_dir in source.resolve().parents:
            raise ValueError(f"source image {source} lies inside the dataset's image folder {images_dir}")
        keep.add(target.resolve())
        stat = source.stat()
        if target.is_file():
            have = target.stat()
            if have.st_size == stat.st_size and have.st_mtime_ns == stat.st_mtime_ns:
                continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        copied += 1
    if images_dir.is_dir():
        for path in images_dir.rglob("*"):
            if path.is_file() and path.resolve() not in keep:
                path.unlink()
    return copied


def typed_empty(columns: dict[str, str]) -> pd.DataFrame:
    """An empty table with ``columns`` (name -> pandas dtype), a valid table for a split the dataset lacks."""
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in columns.items()})
