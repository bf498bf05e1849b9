"""CIFAR-100 test (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/learning-features-2009-TR.pdf): 10,000 images.

The binary version as https://www.cs.toronto.edu/~kriz/cifar.html publishes it (md5
``03b5dce01913d631647c71ecec9e9cb8``, listed on that page): ``cifar-100-binary.tar.gz`` holds
``cifar-100-binary/test.bin``, 10,000 records of 3,074 bytes each (coarse label, fine label, then
the 32x32 image as a red plane, a green plane and a blue plane, each row-major), and
``cifar-100-binary/fine_label_names.txt`` with the 100 fine class names, one a line, in label
order. The pickled Python version is never used (unpickling downloaded files runs their code).

Each record becomes one row of the test split: ``sample_id`` its five-digit position in
``test.bin``, the image written as ``images/test/<sample_id>.png``, ``label`` the fine label,
``label_name`` its name with ``_`` read as a space ("aquarium fish", "maple tree", as in CLIP's
CIFAR-100 class names), and ``coarse_label`` the superclass. The train and val splits are empty.
``max_samples`` keeps a seeded subset of records; only ``test.bin`` and the names are extracted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from vlmopt.data.archives import safe_extract
from vlmopt.data.local_folders import typed_empty
from vlmopt.data.sources import RemoteFile, deterministic_subset, fetch, write_splits

__all__ = ["CIFAR100_FILES", "cifar100_records", "make_cifar100_test"]

ARCHIVE = "cifar-100-binary.tar.gz"
CIFAR100_FILES = (
    RemoteFile(
        ARCHIVE, "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", md5="03b5dce01913d631647c71ecec9e9cb8"
    ),
)
TEST_MEMBER = "cifar-100-binary/test.bin"
NAMES_MEMBER = "cifar-100-binary/fine_label_names.txt"
RECORD_BYTES = 2 + 3 * 32 * 32
TASKS = ("classification",)
COLUMNS = {"sample_id": "object", "image": "object", "label": "int64", "label_name": "object", "coarse_label": "int64"}


def cifar100_records(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coarse labels, fine labels and images (N x 32 x 32 x 3, uint8 RGB) of a CIFAR-100 binary file."""
    if len(data) == 0 or len(data) % RECORD_BYTES:
        raise ValueError(
            f"{TEST_MEMBER}: {len(data)} bytes is not a whole number of {RECORD_BYTES}-byte records "
            "(coarse label, fine label, 3,072 pixel bytes)"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    images = records[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return records[:, 0].astype(np.int64), records[:, 1].astype(np.int64), np.ascontiguousarray(images)


def fine_label_names(text: str) -> list[str]:
    """The class names of ``fine_label_names.txt`` in label order, ``_`` read as a space."""
    return [line.strip().replace("_", " ") for line in text.splitlines() if line.strip()]


def make_cifar100_test(
    root: str | Path,
    *,
    seed: int = 0,
    raw_dir: str | Path,
    max_samples: int | None = None,
    mirror: str | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Download (or reuse) the binary archive into ``raw_dir`` and write the test split under ``root``."""
    root, raw_dir = Path(root), Path(raw_dir)
    files = fetch(CIFAR100_FILES, raw_dir, mirror=mirror, progress=progress)
    extracted_dir = raw_dir / "extracted"
    extracted = safe_extract(files[ARCHIVE], extracted_dir, members=[TEST_MEMBER, NAMES_MEMBER])
    got = {p.relative_to(extracted_dir.resolve()).as_posix() for p in extracted}
    missing = [m for m in (TEST_MEMBER, NAMES_MEMBER) if m not in got]
    if missing:
        raise FileNotFoundError(f"{files[ARCHIVE]} lacks {missing} (the binary CIFAR-100 archive has both)")
    names = fine_label_names((extracted_dir / NAMES_MEMBER).read_text(encoding="utf-8"))
    coarse, fine, images = cifar100_records((extracted_dir / TEST_MEMBER).read_bytes())
    if fine.max() >= len(names):
        raise ValueError(f"{TEST_MEMBER} has fine label {int(fine.max())}, but {NAMES_MEMBER} names {len(names)}")

    width = max(5, len(str(len(fine) - 1)))
    table = pd.DataFrame(
        {
            "sample_id": [f"{i:0{width}d}" for i in range(len(fine))],
            "index": np.arange(len(fine)),
            "label": fine,
            "label_name": [names[y] for y in fine],
            "coarse_label": coarse,
        }
    )
    table = deterministic_subset(table, max_samples, seed=seed)
    table["image"] = [f"images/test/{sid}.png" for sid in table["sample_id"]]
    image_dir = root / "images" / "test"
    image_dir.mkdir(parents=True, exist_ok=True)
    for sid, index in zip(table["sample_id"], table["index"], strict=True):
        Image.fromarray(images[index]).save(image_dir / f"{sid}.png", format="PNG", compress_level=6)
    keep = {f"{sid}.png" for sid in table["sample_id"]}
    for path in image_dir.glob("*.png"):  # Images of an earlier, larger run.
        if path.name not in keep:
            path.unlink()
    table = table[list(COLUMNS)]
    empty = typed_empty(COLUMNS)
    return write_splits(root, {"train": empty, "val": empty, "test": table}, TASKS, COLUMNS)
