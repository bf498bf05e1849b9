"""Labeling real-vs-generated image sets into texts a generative model is finetuned on.

The study this replaces captioned every GenImage image with BLIP-2 twice -- a caption, and an
answer to "What details indicate this image is (not) AI-generated?" -- and wrote one text per
image, "This image is AI-generated|natural, it is an image of {caption}, ... because {reason}",
into ``exp2_train_data9.csv`` / ``exp2_test_data9.csv`` for finetuning. :func:`make_labeled`
does the same from any dataset whose labels are ``real`` (0) / ``generated`` (1) (shapes,
genimage-biggan): it writes

- the canonical tables (``<split>.parquet``: ``sample_id``, ``image``, ``label``,
  ``label_name``, ``text``), which serve the ``real_vs_generated`` task (``text`` is its training
  target) and zero-shot ``classification``;
- ``exp2_train_data9.csv`` and ``exp2_test_data9.csv`` with columns ``image`` (path relative to
  the CSV's folder), ``label`` (0 real, 1 generated) and ``text``, as the study's scripts read them;
- ``images/``: hard links to the source dataset's images (copies where the file system refuses
  links), so the labeled set stands on its own without doubling the disk it takes.

The text (:func:`label_text`) always starts with the label statement ("This image is
AI-generated" / "This image is natural"), followed by ", it is an image of {caption}" when a
caption was generated and ", and it looks AI-generated|natural because {reason}" when a reason
was; :func:`vlmopt.metrics.real_vs_generated.extract_label` reads the statement back (tested on
every combination). Generating captions and reasons needs a model and lives in
:func:`vlmopt.pipeline.label_dataset`, which keeps what the model has generated so far in a
work folder of chunks (:class:`vlmopt.chunks.ChunkStore`, one group of chunks per split, columns
:data:`CHUNK_COLUMNS`) so that a killed labeling job resumes where it stopped; this module only
writes what it is given.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from vlmopt.data.schema import SPLITS, write_table

__all__ = [
    "CAPTIONER_DEFAULTS",
    "CHUNK_COLUMNS",
    "CHUNK_SIZE",
    "CSV_NAMES",
    "LABELED_SOURCE",
    "LABELED_TASKS",
    "REASON_QUESTIONS",
    "STATEMENTS",
    "check_real_generated_labels",
    "label_text",
    "make_labeled",
]

log = logging.getLogger(__name__)

#: The ``source`` of a study's dataset that is labeled from another dataset (by
#: :func:`vlmopt.pipeline.label_dataset`) rather than prepared from published files.
LABELED_SOURCE = "labeled"
#: A labeled dataset's ``captioner`` settings where the study leaves them out: the finetuning slug
#: of the captioning model (``none``: the model as built), whether a reason is asked for besides
#: the caption, images per forward pass, generated tokens at most and beams (1 = greedy).
CAPTIONER_DEFAULTS: dict[str, Any] = {
    "finetune": "none",
    "reason": True,
    "batch_size": 16,
    "max_new_tokens": 20,
    "num_beams": 1,
}
#: The label statement of each label (0 real, 1 generated).
STATEMENTS = {0: "This image is natural", 1: "This image is AI-generated"}
_ADJECTIVES = {0: "natural", 1: "AI-generated"}
#: The question whose answer justifies a label (the study's wording), per label.
REASON_QUESTIONS = {
    0: "What details indicate this image is not AI-generated?",
    1: "What details indicate this image is AI-generated?",
}
#: The study's CSV file of each split that has one.
CSV_NAMES = {"train": "exp2_train_data9.csv", "test": "exp2_test_data9.csv"}
LABELED_TASKS = ("real_vs_generated", "classification")
_NAMES = {0: "real", 1: "generated"}
#: Images labeled per chunk of a split (rounded up to whole batches): what a labeling job keeps in
#: its work folder at a time, and at most what a killed job labels again.
CHUNK_SIZE = 512
#: The text columns of a work folder's chunk files (``sample_id`` first; the reason columns only
#: when reasons are asked for).
CHUNK_COLUMNS = ("sample_id", "caption", "caption_error", "reason", "reason_error")


def label_text(label: int, caption: str | None = None, reason: str | None = None) -> str:
    """The training text of an image with ``label``: its statement, then the caption and reason given."""
    if label not in STATEMENTS:
        raise ValueError(f"label must be 0 (real) or 1 (generated), got {label!r}")
    text = STATEMENTS[label]
    if caption and caption.strip():
        text += f", it is an image of {caption.strip().rstrip('.')}"
    if reason and reason.strip():
        text += f", and it looks {_ADJECTIVES[label]} because {reason.strip().rstrip('.')}"
    return text + "."


def check_real_generated_labels(df: pd.DataFrame, what: str) -> None:
    """Refuse a table whose labels are not 0 ``real`` / 1 ``generated`` (naming what it has instead)."""
    missing = [c for c in ("label", "label_name") if c not in df.columns]
    if missing:
        raise ValueError(f"{what} has no column(s) {missing}: real-vs-generated needs labels 0 real / 1 generated")
    pairs = sorted({(int(label), str(name)) for label, name in zip(df["label"], df["label_name"], strict=True)})
    wrong = [p for p in pairs if _NAMES.get(p[0]) != p[1]]
    if wrong:
        raise ValueError(
            f"{what} has labels {pairs}; real-vs-generated needs exactly 0 'real' and 1 'generated' "
            f"(a dataset labelled by colour or shape cannot serve it)"
        )


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def make_labeled(
    root: str | Path,
    *,
    source_root: str | Path,
    captions: Mapping[str, str] | None = None,
    reasons: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write the labeled tables, CSVs and image links of the dataset at ``source_root`` under ``root``.

    ``captions`` and ``reasons`` map ``sample_id`` to generated text (missing ids get none).
    """
    root, source_root = Path(root), Path(source_root)
    captions, reasons = captions or {}, reasons or {}
    out = {}
    n_images = 0
    for split in SPLITS:
        path = source_root / f"{split}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"labeling: the source split {str(path)!r} is missing")
        df = pd.read_parquet(path)
        check_real_generated_labels(df, f"labeling: {path}")
        texts = [
            label_text(int(label), captions.get(sid), reasons.get(sid))
            for sid, label in zip(df["sample_id"], df["label"], strict=True)
        ]
        table = pd.DataFrame(
            {
                "sample_id": df["sample_id"].astype(str),
                "image": df["image"].astype(str),
                "label": df["label"].astype("int64"),
                "label_name": df["label_name"].astype(str),
                "text": texts,
            }
        )
        outside = [rel for rel in table["image"] if not rel.startswith("images/")]
        if outside:
            raise ValueError(f"labeling: {path} has images outside its images/ folder, e.g. {outside[0]!r}")
        for rel in table["image"]:
            _link(source_root / rel, root / rel)
        n_images += len(table)
        out[split] = write_table(table, root / f"{split}.parquet", tasks=LABELED_TASKS)
        if split in CSV_NAMES:
            table[["image", "label", "text"]].to_csv(root / CSV_NAMES[split], index=False)
    (root / "images").mkdir(parents=True, exist_ok=True)
    log.info("labeled %d images from %s (%d captions, %d reasons)", n_images, source_root, len(captions), len(reasons))
    return out
