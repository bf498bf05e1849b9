"""ImageNet-1k validation (Russakovsky et al. 2015, https://arxiv.org/abs/1409.0575): 50,000 images, 1,000 classes.

The ILSVRC2012 images are only given out after registration, so this source reads a local copy
named by the ``path`` setting: the validation images sorted into one folder per class, named by
its WordNet id (``<path>/<wnid>/<file>.JPEG``, the layout torchvision's ``ImageFolder`` reads
after the usual ``valprep.sh``), and ``<path>/LOC_synset_mapping.txt`` as in the Kaggle
distribution, one class a line: ``n01440764 tench, Tinca tinca``.

Each image becomes one row of the test split (train and val are empty): ``sample_id`` is its file
name without the ending (``ILSVRC2012_val_00000001``), ``label`` the position of its wnid among the
mapping's wnids in sorted order (the standard ImageNet class index, 0 = n01440764), and
``label_name`` the first comma-separated name of the class ("tench"). Two pairs of classes share a
first name in the mapping ("crane": the bird and the machine; "maillot"); each class keeps its own
label. A class folder whose name is not in the mapping is an error; a class of the mapping
without a folder is allowed (a partial copy) and logged. Images are copied to
``images/test/<wnid>/<file>`` (see :mod:`vlmopt.data.local_folders`); ``max_samples`` keeps a
seeded subset, and only those images are copied.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from vlmopt.data.local_folders import image_files, require_folder, sync_images, typed_empty
from vlmopt.data.sources import deterministic_subset, write_splits

__all__ = ["MAPPING_FILE", "make_imagenet_val", "read_synset_mapping"]

log = logging.getLogger(__name__)

NAME = "imagenet-val"
MAPPING_FILE = "LOC_synset_mapping.txt"
LAYOUT = f"<path>/<wnid>/<images> with <path>/{MAPPING_FILE}"
TASKS = ("classification",)
COLUMNS = {"sample_id": "object", "image": "object", "label": "int64", "label_name": "object"}
_WNID = re.compile(r"n\d{8}")


def read_synset_mapping(path: Path) -> dict[str, str]:
    """wnid -> class name (the first comma-separated name) of a ``LOC_synset_mapping.txt``, by wnid order."""
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset {NAME!r}: the class names file {str(path)!r} is missing (expected {LAYOUT}; "
            "lines such as 'n01440764 tench, Tinca tinca')"
        )
    names: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        name = parts[1].split(",")[0].strip() if len(parts) == 2 else ""
        if not _WNID.fullmatch(parts[0]) or not name:
            raise ValueError(f"{path}:{number}: expected '<wnid> <name>, <other names>', got {line.strip()!r}")
        if parts[0] in names:
            raise ValueError(f"{path}:{number}: wnid {parts[0]} is listed twice")
        names[parts[0]] = name
    if not names:
        raise ValueError(f"{path} lists no classes")
    return dict(sorted(names.items()))


def imagenet_table(folder: Path, names: dict[str, str]) -> pd.DataFrame:
    """One row per image in the class folders of ``folder``, folders and files by name."""
    index = {wnid: i for i, wnid in enumerate(names)}
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in class_dirs if p.name not in index]
    if unknown:
        raise ValueError(
            f"dataset {NAME!r}: folder(s) {unknown[:5]} in {str(folder)!r} are not wnids of {MAPPING_FILE} "
            f"({len(unknown)} unknown wnid(s))"
        )
    if not class_dirs:
        loose = image_files(folder)
        hint = f"; it holds {len(loose)} loose images: sort them into class folders first" if loose else ""
        raise FileNotFoundError(f"dataset {NAME!r}: no class folders in {str(folder)!r} (expected {LAYOUT}){hint}")
    absent = len(index) - len(class_dirs)
    if absent:
        log.warning(
            "%s: %d of the %d classes of %s have no folder in %s", NAME, absent, len(index), MAPPING_FILE, folder
        )
    rows, seen = [], {}
    for class_dir in class_dirs:
        files = image_files(class_dir)
        if not files:
            raise FileNotFoundError(f"dataset {NAME!r}: class folder {str(class_dir)!r} holds no images")
        for file in files:
            if file.stem in seen:
                raise ValueError(
                    f"dataset {NAME!r}: image {file.stem!r} is in both {seen[file.stem]} and {class_dir.name}"
                )
            seen[file.stem] = class_dir.name
            rows.append(
                {
                    "sample_id": file.stem,
                    "image": f"images/test/{class_dir.name}/{file.name}",
                    "label": index[class_dir.name],
                    "label_name": names[class_dir.name],
                }
            )
    return pd.DataFrame(rows, columns=list(COLUMNS)).astype({"label": "int64"})


def make_imagenet_val(
    root: str | Path, *, seed: int = 0, path: str | Path | None = None, max_samples: int | None = None
) -> dict[str, Path]:
    """Read the local copy at ``path`` and write its images as the test split under ``root``."""
    folder = require_folder(path, NAME, LAYOUT)
    root = Path(root)
    names = read_synset_mapping(folder / MAPPING_FILE)
    table = deterministic_subset(imagenet_table(folder, names), max_samples, seed=seed)
    pairs = [(folder / rel.removeprefix("images/test/"), root / rel) for rel in table["image"]]
    copied = sync_images(pairs, root / "images")
    log.info("%s: %d images (%d copied) from %s", NAME, len(pairs), copied, folder)
    empty = typed_empty(COLUMNS)
    return write_splits(root, {"train": empty, "val": empty, "test": table}, TASKS, COLUMNS)
