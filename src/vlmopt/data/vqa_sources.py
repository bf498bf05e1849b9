"""Visual question answering evaluation sets, read from the files their authors publish.

Each source writes one row per question to the test split (train and val are written empty):
``sample_id`` (the published question id), ``image`` (relative to the dataset root), ``question``
(whitespace collapsed), ``answers`` (the human answers in published order, unchanged apart from
blank answers being left out; a question left with none is left out) and ``answer_type``. Rows are
ordered by question id. ``max_samples`` keeps a seeded subset of questions, and only the images
those questions need are extracted. None of the publishers gives checksums for these files, so
none are pinned. A JSON file inside an archive is looked for at the archive root, or under a single
folder if that is where the archive keeps it.

``vqav2-val`` -- VQA v2 (Goyal et al. 2017, https://arxiv.org/abs/1612.00837), the val2014 split
(214,354 questions about 40,504 COCO images), from https://visualqa.org/download.html:
``v2_Questions_Val_mscoco.zip`` holds ``v2_OpenEnded_mscoco_val2014_questions.json``
(``questions``: question_id, image_id, question); ``v2_Annotations_Val_mscoco.zip`` holds
``v2_mscoco_val2014_annotations.json`` (``annotations``: question_id, image_id, ``answers`` -- ten
records with ``answer`` --, answer_type, question_type, multiple_choice_answer); COCO's
``val2014.zip`` holds ``val2014/COCO_val2014_<12-digit image id>.jpg``. ``answer_type`` is the
published one (``yes/no``, ``number``, ``other``) and ``question_type`` (the question's opening
words, e.g. ``what color is the``) is kept too.

``textvqa-val`` -- TextVQA (Singh et al. 2019, https://arxiv.org/abs/1904.08920), version 0.5.1 val
(5,000 questions about 3,166 Open Images pictures), from https://textvqa.org/dataset/:
``TextVQA_0.5.1_val.json`` (a plain JSON file, ``data``: question_id, question, image_id,
``answers`` -- ten strings --, among other fields) and ``train_val_images.zip``, which holds the
train and val images together as ``train_images/<image_id>.jpg``. TextVQA publishes no answer
types (its evaluation reports one accuracy), so every row's ``answer_type`` is ``other``.

``gqa-testdev`` -- GQA (Hudson & Manning 2019, https://arxiv.org/abs/1902.09506), the balanced
test-dev split (12,578 questions about 398 images), from https://cs.stanford.edu/people/dorarad/gqa/:
``questions1.2.zip`` holds ``testdev_balanced_questions.json`` (an object keyed by question id:
imageId, question, answer, fullAnswer, ``types`` -- ``structural`` (verify, query, choose, logical,
compare), ``semantic``, ``detailed`` --, ...) and ``images.zip`` holds ``images/<imageId>.jpg``
for every split. GQA gives one answer per question, so ``answers`` is that one answer (GQA scores
exact match); ``answer_type`` is the question's structural type, or ``other`` where a question has
none.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from vlmopt.data.archives import safe_extract
from vlmopt.data.sources import RemoteFile, deterministic_subset, fetch, write_splits

__all__ = [
    "GQA_TESTDEV_FILES",
    "TEXTVQA_VAL_FILES",
    "VQAV2_VAL_FILES",
    "gqa_table",
    "make_gqa_testdev",
    "make_textvqa_val",
    "make_vqav2_val",
    "textvqa_table",
    "vqav2_table",
]

_VQA = "https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa"
VQAV2_VAL_FILES = (
    RemoteFile("v2_Questions_Val_mscoco.zip", f"{_VQA}/v2_Questions_Val_mscoco.zip"),
    RemoteFile("v2_Annotations_Val_mscoco.zip", f"{_VQA}/v2_Annotations_Val_mscoco.zip"),
    RemoteFile("val2014.zip", "http://images.cocodataset.org/zips/val2014.zip"),
)
TEXTVQA_VAL_FILES = (
    RemoteFile("TextVQA_0.5.1_val.json", "https://dl.fbaipublicfiles.com/textvqa/data/TextVQA_0.5.1_val.json"),
    RemoteFile("train_val_images.zip", "https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip"),
)
_GQA = "https://downloads.cs.stanford.edu/nlp/data/gqa"
GQA_TESTDEV_FILES = (
    RemoteFile("questions1.2.zip", f"{_GQA}/questions1.2.zip"),
    RemoteFile("images.zip", f"{_GQA}/images.zip"),
)

TASKS = ("vqa",)
COLUMNS = ("sample_id", "image", "question", "answers", "answer_type")
VQAV2_COLUMNS = (*COLUMNS, "question_type")


def _id_key(question_id: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order, then any others by name."""
    return (0, int(question_id), "") if question_id.isdigit() else (1, 0, question_id)


def _rows(records: Iterable[Any], where: str, convert: Callable[[Any], dict | None], columns) -> pd.DataFrame:
    rows = []
    for record in records:
        try:
            row = convert(record)
        except (KeyError, TypeError) as err:
            shown = json.dumps(record)[:200] if isinstance(record, dict) else repr(record)[:200]
            raise ValueError(f"{where}: a question record lacks the field {err} (record: {shown})") from None
        if row is not None:
            rows.append(row)
    rows.sort(key=lambda r: _id_key(r["sample_id"]))
    return pd.DataFrame(rows, columns=list(columns))


def _question(text: Any) -> str:
    return " ".join(str(text).split())


def _answers(values: Iterable[Any]) -> list[str]:
    return [str(a) for a in values if str(a).strip()]


def _require(data: Any, key: str, where: str) -> Any:
    if not isinstance(data, dict) or key not in data:
        found = sorted(data)[:10] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{where}: expected a JSON object with the key {key!r}, found {found}")
    return data[key]


def vqav2_table(questions: dict, annotations: dict, image_folder: str = "val2014") -> pd.DataFrame:
    """One row per VQA v2 question, joined with its annotation by ``question_id``."""
    by_id = {}
    for ann in _require(annotations, "annotations", "VQA v2 annotations"):
        try:
            by_id[int(ann["question_id"])] = ann
        except (KeyError, TypeError) as err:
            raise ValueError(f"VQA v2 annotations: an annotation lacks the field {err}") from None
    records = _require(questions, "questions", "VQA v2 questions")
    unmatched = sorted({int(q["question_id"]) for q in records if "question_id" in q} - set(by_id))
    if unmatched:
        raise ValueError(
            f"VQA v2: {len(unmatched)} question(s) have no annotation, e.g. question_id {unmatched[:3]}; "
            "are the questions and annotations files of the same split?"
        )

    def convert(q: dict) -> dict | None:
        ann = by_id[int(q["question_id"])]
        answers = _answers(a["answer"] for a in ann["answers"])
        if not answers:
            return None
        return {
            "sample_id": str(q["question_id"]),
            "image": f"images/{image_folder}/COCO_{image_folder}_{int(q['image_id']):012d}.jpg",
            "question": _question(q["question"]),
            "answers": answers,
            "answer_type": str(ann["answer_type"]),
            "question_type": str(ann["question_type"]),
        }

    return _rows(records, "VQA v2 questions", convert, VQAV2_COLUMNS)


def textvqa_table(data: dict, image_folder: str = "train_images") -> pd.DataFrame:
    """One row per TextVQA question; ``answer_type`` is ``other`` (TextVQA publishes none)."""

    def convert(q: dict) -> dict | None:
        answers = _answers(q["answers"])
        if not answers:
            return None
        return {
            "sample_id": str(q["question_id"]),
            "image": f"images/{image_folder}/{q['image_id']}.jpg",
            "question": _question(q["question"]),
            "answers": answers,
            "answer_type": "other",
        }

    return _rows(_require(data, "data", "TextVQA"), "TextVQA", convert, COLUMNS)


def gqa_table(questions: dict) -> pd.DataFrame:
    """One row per GQA question: its single answer, and its structural type as ``answer_type``."""
    if not isinstance(questions, dict):
        raise ValueError(
            f"GQA questions: expected a JSON object keyed by question id, found {type(questions).__name__}"
        )

    def convert(item: tuple[str, dict]) -> dict | None:
        qid, q = item
        answers = _answers([q["answer"]])
        if not answers:
            return None
        types = q.get("types") or {}
        return {
            "sample_id": str(qid),
            "image": f"images/{q['imageId']}.jpg",
            "question": _question(q["question"]),
            "answers": answers,
            "answer_type": str(types.get("structural") or "other"),
        }

    return _rows(questions.items(), "GQA questions", convert, COLUMNS)


def _json_member(archive: Path, name: str, raw_dir: Path) -> Any:
    """Extract the JSON file ``name`` (at the archive root or under one folder) and parse it."""
    if not zipfile.is_zipfile(archive):
        raise ValueError(f"{archive} is not a zip archive; delete it so that a rerun downloads it again")
    with zipfile.ZipFile(archive) as handle:
        names = handle.namelist()
    if name in names:
        member = name
    else:
        nested = [n for n in names if n.endswith("/" + name) and n.count("/") == 1]
        if len(nested) != 1:
            raise FileNotFoundError(
                f"{archive.name} has no member {name!r}"
                + (f" (found {nested})" if nested else "")
                + f"; its first members are {names[:5]}"
            )
        member = nested[0]
    extracted = safe_extract(archive, raw_dir / "extracted", members=[member])
    return json.loads(extracted[0].read_text(encoding="utf-8"))


def _extract_images(archive: Path, dest: Path, wanted: list[str]) -> None:
    """Extract exactly the members ``wanted`` into ``dest``; a missing one is an error naming it."""
    wanted = sorted(set(wanted))
    extracted = safe_extract(archive, dest, members=wanted)
    if len(extracted) != len(wanted):
        got = {p.relative_to(dest.resolve()).as_posix() for p in extracted}
        missing = [w for w in wanted if w not in got]
        raise FileNotFoundError(f"{archive.name} lacks {len(missing)} image(s) the questions need, e.g. {missing[:3]}")


def make_vqav2_val(
    root: str | Path,
    *,
    seed: int = 0,
    raw_dir: str | Path,
    max_samples: int | None = None,
    mirror: str | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Download (or reuse) the VQA v2 val files into ``raw_dir`` and write the dataset under ``root``."""
    root, raw_dir = Path(root), Path(raw_dir)
    files = fetch(VQAV2_VAL_FILES, raw_dir, mirror=mirror, progress=progress)
    questions = _json_member(
        files["v2_Questions_Val_mscoco.zip"], "v2_OpenEnded_mscoco_val2014_questions.json", raw_dir
    )
    annotations = _json_member(files["v2_Annotations_Val_mscoco.zip"], "v2_mscoco_val2014_annotations.json", raw_dir)
    table = deterministic_subset(vqav2_table(questions, annotations), max_samples, seed=seed)
    _extract_images(files["val2014.zip"], root / "images", [rel.removeprefix("images/") for rel in table["image"]])
    return write_splits(root, {"test": table}, TASKS, VQAV2_COLUMNS)


def make_textvqa_val(
    root: str | Path,
    *,
    seed: int = 0,
    raw_dir: str | Path,
    max_samples: int | None = None,
    mirror: str | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Download (or reuse) the TextVQA 0.5.1 val files into ``raw_dir`` and write the dataset under ``root``."""
    root, raw_dir = Path(root), Path(raw_dir)
    files = fetch(TEXTVQA_VAL_FILES, raw_dir, mirror=mirror, progress=progress)
    data = json.loads(files["TextVQA_0.5.1_val.json"].read_text(encoding="utf-8"))
    table = deterministic_subset(textvqa_table(data), max_samples, seed=seed)
    _extract_images(files["train_val_images.zip"], root / "images", [r.removeprefix("images/") for r in table["image"]])
    return write_splits(root, {"test": table}, TASKS, COLUMNS)


def make_gqa_testdev(
    root: str | Path,
    *,
    seed: int = 0,
    raw_dir: str | Path,
    max_samples: int | None = None,
    mirror: str | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Download (or reuse) the GQA files into ``raw_dir`` and write the balanced test-dev split under ``root``."""
    root, raw_dir = Path(root), Path(raw_dir)
    files = fetch(GQA_TESTDEV_FILES, raw_dir, mirror=mirror, progress=progress)
    questions = _json_member(files["questions1.2.zip"], "testdev_balanced_questions.json", raw_dir)
    table = deterministic_subset(gqa_table(questions), max_samples, seed=seed)
    # The archive's members are already ``images/<imageId>.jpg``, the table's paths under the root.
    _extract_images(files["images.zip"], root, list(table["image"]))
    return write_splits(root, {"test": table}, TASKS, COLUMNS)
