"""Karpathy splits of COCO 2014 and Flickr30k (Karpathy & Fei-Fei 2015, https://arxiv.org/abs/1412.2306).

The splits are published as one archive, ``caption_datasets.zip``
(https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip, no checksum is
published), holding ``dataset_coco.json``, ``dataset_flickr30k.json`` and ``dataset_flickr8k.json``
(at the archive root; a copy that keeps them under one folder is read too). Each file is
``{"dataset": ..., "images": [...]}``; an image record has ``filename``, ``imgid`` (its position
in Karpathy's list), ``split`` (``train``, ``val``, ``test``, and for COCO also ``restval``: the
val2014 images outside the 5,000 val and 5,000 test ones), ``sentences`` (records with ``raw``,
the caption as written, and ``tokens``, ``imgid``, ``sentid``) and ``sentids``; COCO records add
``filepath`` (``val2014`` or ``train2014``, the COCO 2014 folder holding the image) and
``cocoid`` (the COCO image id).

Every row has the image's captions -- the sentences' ``raw`` texts in published order, whitespace
collapsed, blank ones left out -- as both the captioning references and the retrieval captions;
an image left without captions is left out. Rows are in ``imgid`` order. ``max_samples`` keeps a
seeded subset of at most that many images in each split written, and only their images are
extracted or copied.

``coco2014-karpathy`` -- Karpathy's COCO 2014 split (5,000 test, 5,000 val and 113,287 train
images: 82,783 ``train`` from train2014 and 30,504 ``restval`` from val2014). The ``splits``
setting picks the splits written (default ``["test"]``; any of ``train``, ``val``, ``test``); the
others are written empty. ``train`` is Karpathy's ``train`` plus ``restval`` (the usual 113k
training set). ``sample_id`` is the COCO image id. Images come from cocodataset.org's archives
(no checksums are published): ``val2014.zip`` holds ``val2014/COCO_val2014_<12-digit id>.jpg``
(about 6 GB) and ``train2014.zip`` holds ``train2014/COCO_train2014_<12-digit id>.jpg`` (13 GB);
``train2014.zip`` is downloaded only when ``train`` is asked for. Images are extracted to
``images/<filepath>/<filename>``.

``flickr30k-1k`` -- Karpathy's Flickr30k test split (1,000 images, five captions each), the usual
Flickr30k retrieval benchmark; train and val are written empty. Flickr30k's images are given out
only through the authors' request form, so they are read from a local folder named by the ``path``
setting: either ``<path>/flickr30k-images/<filename>`` (as the published ``flickr30k-images.tar``
unpacks) or ``<path>/<filename>``. The captions come from ``dataset_flickr30k.json`` (downloaded).
``sample_id`` is the file name without its ending (the Flickr photo id); images are copied to
``images/flickr30k-images/<filename>`` (see :mod:`vlmopt.data.local_folders`).
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from vlmopt.data.archives import safe_extract
from vlmopt.data.local_folders import require_folder, sync_images
from vlmopt.data.schema import SPLITS
from vlmopt.data.sources import RemoteFile, deterministic_subset, fetch, write_splits

__all__ = [
    "CAPTION_DATASETS",
    "COCO2014_FILES",
    "karpathy_table",
    "make_coco2014_karpathy",
    "make_flickr30k_1k",
    "read_karpathy_json",
]

log = logging.getLogger(__name__)

CAPTION_DATASETS = RemoteFile(
    "caption_datasets.zip", "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
)
#: COCO 2014 folder named by a record's ``filepath`` -> the archive that holds it.
COCO2014_FILES = {
    "val2014": RemoteFile("val2014.zip", "http://images.cocodataset.org/zips/val2014.zip"),
    "train2014": RemoteFile("train2014.zip", "http://images.cocodataset.org/zips/train2014.zip"),
}
#: Karpathy's split name -> the split it is written to.
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
TASKS = ("captioning", "retrieval")
COLUMNS = ("sample_id", "image", "references", "captions")
FLICKR_NAME = "flickr30k-1k"
FLICKR_FOLDER = "flickr30k-images"
FLICKR_LAYOUT = f"<path>/{FLICKR_FOLDER}/<filename>.jpg or <path>/<filename>.jpg"


def read_karpathy_json(archive: Path, name: str, raw_dir: Path) -> list[dict]:
    """Extract ``name`` from ``caption_datasets.zip`` (at its root or under one folder); its image records."""
    if not zipfile.is_zipfile(archive):
        raise ValueError(f"{archive} is not a zip archive; delete it so that a rerun downloads it again")
    with zipfile.ZipFile(archive) as handle:
        names = handle.namelist()
    candidates = [n for n in names if n == name or (n.endswith("/" + name) and n.count("/") == 1)]
    if len(candidates) != 1:
        raise FileNotFoundError(
            f"{archive.name} has no member {name!r}"
            + (f" (found several: {candidates})" if candidates else "")
            + f"; its first members are {names[:5]}"
        )
    extracted = safe_extract(archive, raw_dir / "extracted", members=candidates)
    data = json.loads(extracted[0].read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        found = sorted(data)[:10] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{name}: expected a JSON object with an 'images' list, found {found}")
    return data["images"]


def karpathy_table(
    images: Iterable[dict], where: str, image: Callable[[dict], str], sample_id: Callable[[dict], str]
) -> dict[str, pd.DataFrame]:
    """Split -> rows (``imgid`` order) of the Karpathy records; ``image``/``sample_id`` give those columns."""
    rows: dict[str, list[tuple[int, dict]]] = {split: [] for split in SPLITS}
    for record in images:
        try:
            split = KARPATHY_SPLITS.get(record["split"])
            if split is None:
                raise ValueError(
                    f"{where}: image {record.get('filename')!r} has the split {record['split']!r}; "
                    f"expected one of {sorted(KARPATHY_SPLITS)}"
                )
            texts = [" ".join(str(s["raw"]).split()) for s in record["sentences"]]
            texts = [t for t in texts if t]
            if texts:
                row = {
                    "sample_id": sample_id(record),
                    "image": image(record),
                    "references": texts,
                    "captions": list(texts),
                }
                rows[split].append((int(record["imgid"]), row))
        except (KeyError, TypeError) as err:
            shown = json.dumps(record)[:200] if isinstance(record, dict) else repr(record)[:200]
            raise ValueError(f"{where}: an image record lacks the field {err} (record: {shown})") from None
    return {
        split: pd.DataFrame([row for _, row in sorted(found, key=lambda r: r[0])], columns=list(COLUMNS))
        for split, found in rows.items()
    }


def _coco_image(record: dict) -> str:
    folder = record["filepath"]
    if folder not in COCO2014_FILES:
        raise ValueError(
            f"dataset_coco.json: image {record['filename']!r} has filepath {folder!r}; "
            f"expected one of {sorted(COCO2014_FILES)}"
        )
    return f"images/{folder}/{record['filename']}"


def _requested_splits(splits: Any) -> list[str]:
    chosen = [splits] if isinstance(splits, str) else list(splits)
    unknown = [s for s in chosen if s not in SPLITS]
    if not chosen or unknown:
        raise ValueError(
            f"dataset 'coco2014-karpathy': setting 'splits' must name some of {list(SPLITS)}, got {splits!r}"
        )
    return chosen


def make_coco2014_karpathy(
    root: str | Path,
    *,
    seed: int = 0,
    raw_dir: str | Path,
    splits: Iterable[str] | str = ("test",),
    max_samples: int | None = None,
    mirror: str | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Download (or reuse) the Karpathy split and the COCO 2014 archives it needs; write ``splits`` under ``root``."""
    root, raw_dir = Path(root), Path(raw_dir)
    chosen = _requested_splits(splits)
    files = fetch([CAPTION_DATASETS], raw_dir, mirror=mirror, progress=progress)
    images = read_karpathy_json(files[CAPTION_DATASETS.name], "dataset_coco.json", raw_dir)
    tables = karpathy_table(images, "dataset_coco.json", _coco_image, lambda r: str(int(r["cocoid"])))
    tables = {
        split: deterministic_subset(table, max_samples, seed=seed) if split in chosen else table.iloc[:0]
        for split, table in tables.items()
    }
    wanted: dict[str, list[str]] = {}
    for table in tables.values():
        for rel in table["image"]:
            member = rel.removeprefix("images/")
            wanted.setdefault(member.split("/", 1)[0], []).append(member)
    archives = fetch([COCO2014_FILES[f] for f in sorted(wanted)], raw_dir, mirror=mirror, progress=progress)
    for folder, members in sorted(wanted.items()):
        _extract(archives[COCO2014_FILES[folder].name], root / "images", members)
    return write_splits(root, tables, TASKS, COLUMNS)


def _extract(archive: Path, dest: Path, wanted: list[str]) -> None:
    """Extract exactly the members ``wanted`` into ``dest``; a missing one is an error naming it."""
    wanted = sorted(set(wanted))
    extracted = safe_extract(archive, dest, members=wanted)
    if len(extracted) != len(wanted):
        got = {p.relative_to(dest.resolve()).as_posix() for p in extracted}
        missing = [w for w in wanted if w not in got]
        raise FileNotFoundError(f"{archive.name} lacks {len(missing)} image(s) of the split, e.g. {missing[:3]}")


def make_flickr30k_1k(
    root: str | Path,
    *,
    seed: int = 0,
    raw_dir: str | Path,
    path: str | Path | None = None,
    max_samples: int | None = None,
    mirror: str | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Write Karpathy's Flickr30k test split under ``root``: captions downloaded, images from ``path``."""
    folder = require_folder(path, FLICKR_NAME, FLICKR_LAYOUT)
    if (folder / FLICKR_FOLDER).is_dir():
        folder = folder / FLICKR_FOLDER
    root, raw_dir = Path(root), Path(raw_dir)
    files = fetch([CAPTION_DATASETS], raw_dir, mirror=mirror, progress=progress)
    images = read_karpathy_json(files[CAPTION_DATASETS.name], "dataset_flickr30k.json", raw_dir)
    tables = karpathy_table(
        images,
        "dataset_flickr30k.json",
        lambda r: f"images/{FLICKR_FOLDER}/{r['filename']}",
        lambda r: Path(r["filename"]).stem,
    )
    table = deterministic_subset(tables["test"], max_samples, seed=seed)
    pairs = [(folder / Path(rel).name, root / rel) for rel in table["image"]]
    missing = [source.name for source, _ in pairs if not source.is_file()]
    if missing:
        raise FileNotFoundError(
            f"dataset {FLICKR_NAME!r}: {len(missing)} test image(s) are not in {str(folder)!r}, e.g. {missing[:3]} "
            f"(expected {FLICKR_LAYOUT})"
        )
    copied = sync_images(pairs, root / "images")
    log.info("%s: %d images (%d copied) from %s", FLICKR_NAME, len(pairs), copied, folder)
    return write_splits(root, {"test": table}, TASKS, COLUMNS)
