"""ImageNetV2 (Recht et al. 2019, https://arxiv.org/abs/1902.10811): new test images for ImageNet's 1,000 classes.

The matched-frequency version (10,000 images, ten per class) as its authors publish it on the
Hugging Face hub (https://huggingface.co/datasets/vaishaal/ImageNetV2, no checksum is given in the
paper or the repository's README, so none is pinned): ``imagenetv2-matched-frequency.tar.gz``
holds ``imagenetv2-matched-frequency-format-val/<class index>/<hash>.jpeg``, one folder per class
named by its ImageNet class index ``0`` .. ``999`` written in decimal (read as numbers: sorting the
folder names as text, as an image-folder reader does, mislabels most classes). Other members and
non-image files are ignored; a leading ``./`` in member names is accepted.

The archive has no class names, so the ``classes`` setting names a ``LOC_synset_mapping.txt``
(lines such as ``n01440764 tench, Tinca tinca``, read as the ``imagenet-val`` source reads it):
class index ``i`` is the ``i``-th wnid in sorted order, the standard ImageNet index. The mapping
must list all 1,000 classes, since a partial one would shift every index.

Each image becomes one row of the test split (train and val are empty): ``sample_id`` is
``<class index>/<hash>`` (its path in the archive's folder, without the ending), ``label`` the class
index, ``label_name`` the class's first comma-separated name. Rows are ordered by class index, then
file name. Images are extracted to ``images/imagenetv2-matched-frequency-format-val/<index>/<file>``;
``max_samples`` keeps a seeded subset, and only its images are extracted.
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

import pandas as pd

from vlmopt.data.archives import safe_extract
from vlmopt.data.imagenet import MAPPING_FILE, read_synset_mapping
from vlmopt.data.local_folders import IMAGE_SUFFIXES, typed_empty
from vlmopt.data.sources import RemoteFile, deterministic_subset, fetch, write_splits

__all__ = ["IMAGENETV2_FILES", "imagenetv2_table", "make_imagenetv2"]

NAME = "imagenetv2"
IMAGENETV2_FILES = (
    RemoteFile(
        "imagenetv2-matched-frequency.tar.gz",
        "https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/imagenetv2-matched-frequency.tar.gz",
    ),
)
FOLDER = "imagenetv2-matched-frequency-format-val"
N_CLASSES = 1000
TASKS = ("classification",)
COLUMNS = {"sample_id": "object", "image": "object", "label": "int64", "label_name": "object"}


def imagenetv2_table(members: list[str], names: list[str]) -> pd.DataFrame:
    """One row per image member ``FOLDER/<index>/<file>``; ``names[i]`` is class ``i``'s name."""
    rows = []
    for member in members:
        parts = PurePosixPath(member).parts
        if len(parts) != 3 or parts[0] != FOLDER or PurePosixPath(member).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        index = parts[1]
        if not (index.isascii() and index.isdigit() and int(index) < len(names)):
            raise ValueError(
                f"dataset {NAME!r}: archive member {member!r} is in folder {index!r}, "
                f"not a class index 0..{len(names) - 1}"
            )
        label = int(index)
        stem = PurePosixPath(parts[2]).stem
        rows.append(
            {
                "sample_id": f"{label}/{stem}",
                "image": f"images/{'/'.join(parts)}",
                "label": label,
                "label_name": names[label],
            }
        )
    if not rows:
        raise FileNotFoundError(
            f"dataset {NAME!r}: the archive holds no images under {FOLDER}/<class index>/; "
            f"its first members are {members[:5]}"
        )
    rows.sort(key=lambda r: (r["label"], r["image"]))
    table = pd.DataFrame(rows, columns=list(COLUMNS)).astype({"label": "int64"})
    dupes = table["sample_id"][table["sample_id"].duplicated()]
    if len(dupes):
        raise ValueError(f"dataset {NAME!r}: image(s) {sorted(set(dupes))[:3]} appear more than once in the archive")
    return table


def _class_names(classes: str | Path | None) -> list[str]:
    layout = f"a {MAPPING_FILE} with lines such as 'n01440764 tench, Tinca tinca'"
    if classes is None or str(classes).strip() == "":
        raise ValueError(f"dataset {NAME!r} needs the setting 'classes': the path of {layout}")
    path = Path(classes)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {NAME!r}: classes file {str(path)!r} does not exist (expected {layout})")
    names = list(read_synset_mapping(path).values())
    if len(names) != N_CLASSES:
        raise ValueError(
            f"dataset {NAME!r}: {path} lists {len(names)} classes; ImageNetV2's folders index all {N_CLASSES} "
            "ImageNet classes in sorted-wnid order, so the mapping must list all of them"
        )
    return names


def make_imagenetv2(
    root: str | Path,
    *,
    seed: int = 0,
    raw_dir: str | Path,
    classes: str | Path | None = None,
    max_samples: int | None = None,
    mirror: str | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Download (or reuse) the matched-frequency archive into ``raw_dir`` and write the test split under ``root``."""
    names = _class_names(classes)
    root, raw_dir = Path(root), Path(raw_dir)
    archive = fetch(IMAGENETV2_FILES, raw_dir, mirror=mirror, progress=progress)[IMAGENETV2_FILES[0].name]
    if not tarfile.is_tarfile(archive):
        raise ValueError(f"{archive} is not a tar archive; delete it so that a rerun downloads it again")
    with tarfile.open(archive) as handle:
        members = [m.name for m in handle.getmembers() if m.isfile()]
    table = deterministic_subset(imagenetv2_table(members, names), max_samples, seed=seed)
    # A member may be stored as ``./<FOLDER>/...``; it is extracted to the same place as ``<FOLDER>/...``.
    by_path = {PurePosixPath(m).as_posix(): m for m in members}
    wanted = [by_path[rel.removeprefix("images/")] for rel in table["image"]]
    extracted = safe_extract(archive, root / "images", members=wanted)
    if len(extracted) != len(wanted):  # Only a member listed twice in the archive gets here.
        raise ValueError(f"dataset {NAME!r}: extracted {len(extracted)} files for {len(wanted)} images")
    empty = typed_empty(COLUMNS)
    return write_splits(root, {"train": empty, "val": empty, "test": table}, TASKS, COLUMNS)
