"""GenImage's BigGAN subset (Zhu et al. 2023, https://arxiv.org/abs/2306.08571): real vs generated images.

GenImage is distributed on cloud drives (no fixed URL, no published checksums), so this source
reads a local copy named by the ``path`` setting, laid out as the subset unpacks:
``<path>/train/ai``, ``<path>/train/nature``, ``<path>/val/ai`` and ``<path>/val/nature``, each
holding image files (BigGAN's images as PNG, the ImageNet ones as JPEG; 162,000 + 162,000 in
train, 6,000 + 6,000 in val). All four folders must exist and hold images.

Splits: ``train`` is read from ``train/``, ``test`` from ``val/`` (GenImage's evaluation set); the
``val`` split is empty, so the published test images are never used for model selection. Labels
follow the shapes dataset: 1 ``generated`` (``ai``), 0 ``real`` (``nature``). ``sample_id`` is the
image's path in the local copy (``val/ai/<file>``); images are copied to
``images/<split>/<ai|nature>/<file>`` (see :mod:`vlmopt.data.local_folders`). ``max_samples``
keeps a seeded subset of at most that many images in each of train and test, and only those are copied.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from vlmopt.data.local_folders import image_files, require_folder, sync_images, typed_empty
from vlmopt.data.sources import deterministic_subset, write_splits
from vlmopt.data.synthetic import LABEL_NAMES

__all__ = ["CLASS_FOLDERS", "make_genimage_biggan"]

log = logging.getLogger(__name__)

NAME = "genimage-biggan"
LAYOUT = "<path>/{train,val}/{ai,nature}/<image files>"
#: Class folder -> label (the label names are the shapes dataset's: 0 real, 1 generated).
CLASS_FOLDERS = {"nature": 0, "ai": 1}
#: Our split -> the subset's folder it is read from.
SPLIT_FOLDERS = {"train": "train", "test": "val"}
TASKS = ("classification", "real_vs_generated")
COLUMNS = {"sample_id": "object", "image": "object", "label": "int64", "label_name": "object"}


def genimage_table(folder: Path, split: str) -> pd.DataFrame:
    """One row per image of ``folder``'s subset folder for ``split``, classes ``nature`` then ``ai``, files by name."""
    source = SPLIT_FOLDERS[split]
    rows = []
    for class_folder, label in CLASS_FOLDERS.items():
        path = folder / source / class_folder
        if not path.is_dir():
            raise FileNotFoundError(f"dataset {NAME!r}: folder {str(path)!r} is missing (expected {LAYOUT})")
        files = image_files(path)
        if not files:
            raise FileNotFoundError(f"dataset {NAME!r}: folder {str(path)!r} holds no images (expected {LAYOUT})")
        for file in files:
            rows.append(
                {
                    "sample_id": f"{source}/{class_folder}/{file.name}",
                    "image": f"images/{split}/{class_folder}/{file.name}",
                    "label": label,
                    "label_name": LABEL_NAMES[label],
                }
            )
    return pd.DataFrame(rows, columns=list(COLUMNS)).astype({"label": "int64"})


def make_genimage_biggan(
    root: str | Path, *, seed: int = 0, path: str | Path | None = None, max_samples: int | None = None
) -> dict[str, Path]:
    """Read the local copy at ``path`` and write the dataset (train and test; val empty) under ``root``."""
    folder = require_folder(path, NAME, LAYOUT)
    root = Path(root)
    tables = {
        split: deterministic_subset(genimage_table(folder, split), max_samples, seed=seed) for split in SPLIT_FOLDERS
    }
    pairs = [
        (folder / sid, root / rel)
        for table in tables.values()
        for sid, rel in zip(table["sample_id"], table["image"], strict=True)
    ]
    copied = sync_images(pairs, root / "images")
    log.info("%s: %d images (%d copied) from %s", NAME, len(pairs), copied, folder)
    return write_splits(root, {**tables, "val": typed_empty(COLUMNS)}, TASKS, COLUMNS)
