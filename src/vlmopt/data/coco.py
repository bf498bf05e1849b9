"""COCO captions (Chen et al. 2015, https://arxiv.org/abs/1504.00325): the val2017 images with their captions.

Files as cocodataset.org publishes them (no checksums are published): ``val2017.zip`` holds
``val2017/<12-digit id>.jpg`` and ``annotations_trainval2017.zip`` holds
``annotations/captions_val2017.json`` (``images``: id, file_name; ``annotations``: image_id, id,
caption). Each image becomes one row of the test split: its captions (usually five) in annotation
id order are the captioning references and the retrieval captions. ``max_samples`` keeps a seeded
subset of images, and only their files are extracted.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pandas as pd

from vlmopt.data.archives import safe_extract
from vlmopt.data.sources import RemoteFile, deterministic_subset, fetch, write_splits

__all__ = ["COCO2017_VAL_FILES", "make_coco2017_val"]

COCO2017_VAL_FILES = (
    RemoteFile(
        "annotations_trainval2017.zip", "http://images.cocodataset.org/annotations/annotations_trainval2017.zip"
    ),
    RemoteFile("val2017.zip", "http://images.cocodataset.org/zips/val2017.zip"),
)
TASKS = ("captioning", "retrieval")
COLUMNS = ("sample_id", "image", "references", "captions")


def caption_table(annotations: dict, image_folder: str) -> pd.DataFrame:
    """One row per image that has captions: ``sample_id`` (the COCO image id), image path, captions."""
    captions: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for ann in annotations["annotations"]:
        captions[int(ann["image_id"])].append((int(ann["id"]), " ".join(str(ann["caption"]).split())))
    rows = []
    for image in sorted(annotations["images"], key=lambda im: int(im["id"])):
        texts = [text for _, text in sorted(captions.get(int(image["id"]), []))]
        if texts:
            rows.append(
                {
                    "sample_id": str(image["id"]),
                    "image": f"images/{image_folder}/{image['file_name']}",
                    "references": texts,
                    "captions": list(texts),
                }
            )
    return pd.DataFrame(rows, columns=list(COLUMNS))


def make_coco2017_val(
    root: str | Path,
    *,
    seed: int = 0,
    raw_dir: str | Path,
    max_samples: int | None = None,
    mirror: str | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Download (or reuse) the val2017 files into ``raw_dir`` and write the dataset under ``root``."""
    root, raw_dir = Path(root), Path(raw_dir)
    files = fetch(COCO2017_VAL_FILES, raw_dir, mirror=mirror, progress=progress)
    member = "annotations/captions_val2017.json"
    safe_extract(files["annotations_trainval2017.zip"], raw_dir / "extracted", members=[member])
    annotations = json.loads((raw_dir / "extracted" / member).read_text())
    table = deterministic_subset(caption_table(annotations, "val2017"), max_samples, seed=seed)
    wanted = [rel.removeprefix("images/") for rel in table["image"]]
    extracted = safe_extract(files["val2017.zip"], root / "images", members=wanted)
    if len(extracted) != len(wanted):
        missing = sorted(set(wanted) - {p.relative_to((root / "images").resolve()).as_posix() for p in extracted})
        raise FileNotFoundError(f"val2017.zip lacks {len(missing)} captioned images, e.g. {missing[:3]}")
    return write_splits(root, {"test": table}, TASKS, COLUMNS)
