"""VQA v2, TextVQA and GQA from files in their published layouts, served by a loopback HTTP server."""

from __future__ import annotations

import io
import json
import zipfile

import pandas as pd
import pytest
from PIL import Image

from vlmopt.data import DATASETS
from vlmopt.pipeline import prepare_dataset


def _jpeg(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 0, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


def _vqa_answers(*answers: str) -> list[dict]:
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


# VQA v2: questions listed out of id order; two questions share image 42; image 73 has no question.
VQAV2_QUESTIONS = [
    {"image_id": 42, "question": "How many  dogs are there?", "question_id": 42002},
    {"image_id": 42, "question": "Is it sunny?", "question_id": 42000},
    {"image_id": 9, "question": "What color is the bus?", "question_id": 9001},
]
VQAV2_ANNOTATIONS = [
    {
        "question_id": 9001,
        "image_id": 9,
        "question_type": "what color is the",
        "answer_type": "other",
        "multiple_choice_answer": "red",
        "answers": _vqa_answers(*["red"] * 8, "dark red", "orange"),
    },
    {
        "question_id": 42000,
        "image_id": 42,
        "question_type": "is it",
        "answer_type": "yes/no",
        "multiple_choice_answer": "yes",
        "answers": _vqa_answers(*["yes"] * 9, "no"),
    },
    {
        "question_id": 42002,
        "image_id": 42,
        "question_type": "how many",
        "answer_type": "number",
        "multiple_choice_answer": "2",
        "answers": _vqa_answers("2", "2", "two", "2", "3", "2", "2", "2", "", "2"),
    },
]

# TextVQA: the val file's images sit among the train images in train_images/.
TEXTVQA_DATA = [
    {
        "question": "what brand is the  phone?",
        "image_id": "b0a1",
        "image_classes": ["Mobile phone"],
        "answers": ["nokia"] * 7 + ["Nokia", "nokia phone", "nokia"],
        "question_tokens": ["what", "brand", "is", "the", "phone"],
        "question_id": 34602,
        "set_name": "val",
    },
    {
        "question": "what number is on the shirt?",
        "image_id": "0c3f",
        "answers": ["23"] * 9 + [" "],
        "question_id": 34600,
        "set_name": "val",
    },
    {"question": "what does the sign say?", "image_id": "0c3f", "answers": [""] * 10, "question_id": 34605},
]

# GQA test-dev balanced: keyed by question id; one question carries no "types".
GQA_QUESTIONS = {
    "20968379": {
        "semantic": [],
        "entailed": [],
        "equivalent": ["20968379"],
        "question": "Is the sky blue?",
        "imageId": "n288870",
        "isBalanced": True,
        "groups": {"global": None, "local": "13-sky_blue"},
        "answer": "yes",
        "semanticStr": "select: sky ->verify color: blue",
        "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
        "types": {"detailed": "verifyAttr", "semantic": "attr", "structural": "verify"},
        "fullAnswer": "Yes, the sky is blue.",
    },
    "201307251": {
        "question": "Which side is the  man on?",
        "imageId": "n161313",
        "answer": "left",
        "types": {"detailed": "positionQuery", "semantic": "rel", "structural": "query"},
        "fullAnswer": "The man is on the left of the image.",
    },
    "05451384": {"question": "What is on the table?", "imageId": "n288870", "answer": "plate"},
}

IMAGES = {
    "val2014.zip": {f"val2014/COCO_val2014_{i:012d}.jpg": _jpeg(i) for i in (9, 42, 73)},
    "train_val_images.zip": {f"train_images/{i}.jpg": _jpeg(n) for n, i in enumerate(("0c3f", "b0a1", "ffff"))},
    "images.zip": {f"images/{i}.jpg": _jpeg(n) for n, i in enumerate(("n161313", "n288870", "n1"))},
}


def _serve(server, *, vqav2=True, textvqa=True, gqa=True) -> None:
    if vqav2:
        questions = {"data_subtype": "val2014", "task_type": "Open-Ended", "questions": VQAV2_QUESTIONS}
        annotations = {"data_subtype": "val2014", "annotations": VQAV2_ANNOTATIONS}
        server.files["v2_Questions_Val_mscoco.zip"] = _zip(
            {"v2_OpenEnded_mscoco_val2014_questions.json": json.dumps(questions).encode()}
        )
        server.files["v2_Annotations_Val_mscoco.zip"] = _zip(
            {"v2_mscoco_val2014_annotations.json": json.dumps(annotations).encode()}
        )
        server.files["val2014.zip"] = _zip(IMAGES["val2014.zip"])
    if textvqa:
        val = {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": TEXTVQA_DATA}
        server.files["TextVQA_0.5.1_val.json"] = json.dumps(val).encode()
        server.files["train_val_images.zip"] = _zip(IMAGES["train_val_images.zip"])
    if gqa:
        server.files["questions1.2.zip"] = _zip(
            {
                "testdev_balanced_questions.json": json.dumps(GQA_QUESTIONS).encode(),
                "train_balanced_questions.json": b"{}",
                "readme.txt": b"GQA questions",
            }
        )
        server.files["images.zip"] = _zip(IMAGES["images.zip"])


@pytest.fixture
def vqa_server(http_server):
    _serve(http_server)
    return http_server


def _prepare(server, source, out, *, default_raw=False, seed=0, **settings):
    """Prepare ``source`` into ``out``, downloading into ``<out's folder>/raw/<out's name>``."""
    raw = None if default_raw else out.parent / "raw" / out.name
    prepare_dataset(out.name, {"source": source, "mirror": server.url(""), **settings}, out, seed=seed, raw_dir=raw)
    return pd.read_parquet(out / "test.parquet")


def _lists(values) -> list[list[str]]:
    return [list(v) for v in values]


def test_vqav2_val_converts_the_published_layout(vqa_server, tmp_path):
    out = tmp_path / "resources" / "data" / "vqav2"
    test = _prepare(vqa_server, "vqav2-val", out)
    assert list(test.columns) == ["sample_id", "image", "question", "answers", "answer_type", "question_type"]
    assert list(test["sample_id"]) == ["9001", "42000", "42002"]
    assert list(test["image"]) == [
        "images/val2014/COCO_val2014_000000000009.jpg",
        "images/val2014/COCO_val2014_000000000042.jpg",
        "images/val2014/COCO_val2014_000000000042.jpg",
    ]
    assert list(test["question"]) == ["What color is the bus?", "Is it sunny?", "How many dogs are there?"]
    # The ten answers in published order; the blank one is left out.
    assert _lists(test["answers"]) == [
        ["red"] * 8 + ["dark red", "orange"],
        ["yes"] * 9 + ["no"],
        ["2", "2", "two", "2", "3", "2", "2", "2", "2"],
    ]
    assert list(test["answer_type"]) == ["other", "yes/no", "number"]
    assert list(test["question_type"]) == ["what color is the", "is it", "how many"]
    # Only the two images with questions were extracted, byte for byte.
    folder = out / "images" / "val2014"
    assert sorted(p.name for p in folder.iterdir()) == [
        "COCO_val2014_000000000009.jpg",
        "COCO_val2014_000000000042.jpg",
    ]
    assert (folder / "COCO_val2014_000000000042.jpg").read_bytes() == _jpeg(42)
    assert len(pd.read_parquet(out / "train.parquet")) == 0 and len(pd.read_parquet(out / "val.parquet")) == 0


def test_textvqa_val_converts_the_published_layout(vqa_server, tmp_path):
    out = tmp_path / "textvqa"
    test = _prepare(vqa_server, "textvqa-val", out)
    assert list(test.columns) == ["sample_id", "image", "question", "answers", "answer_type"]
    # 34605 has only blank answers and is left out.
    assert list(test["sample_id"]) == ["34600", "34602"]
    assert list(test["image"]) == ["images/train_images/0c3f.jpg", "images/train_images/b0a1.jpg"]
    assert list(test["question"]) == ["what number is on the shirt?", "what brand is the phone?"]
    assert _lists(test["answers"]) == [["23"] * 9, ["nokia"] * 7 + ["Nokia", "nokia phone", "nokia"]]
    assert list(test["answer_type"]) == ["other", "other"]  # TextVQA publishes no answer types
    assert sorted(p.name for p in (out / "images" / "train_images").iterdir()) == ["0c3f.jpg", "b0a1.jpg"]


def test_gqa_testdev_converts_the_published_layout(vqa_server, tmp_path):
    out = tmp_path / "gqa"
    test = _prepare(vqa_server, "gqa-testdev", out)
    assert list(test.columns) == ["sample_id", "image", "question", "answers", "answer_type"]
    assert list(test["sample_id"]) == ["05451384", "20968379", "201307251"]  # numeric order of the ids
    assert list(test["image"]) == ["images/n288870.jpg", "images/n288870.jpg", "images/n161313.jpg"]
    assert list(test["question"]) == ["What is on the table?", "Is the sky blue?", "Which side is the man on?"]
    assert _lists(test["answers"]) == [["plate"], ["yes"], ["left"]]
    assert list(test["answer_type"]) == ["other", "verify", "query"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["n161313.jpg", "n288870.jpg"]
    assert (out / "images" / "n161313.jpg").read_bytes() == _jpeg(0)
    # Only the test-dev questions were extracted from the questions archive.
    extracted = tmp_path / "raw" / "gqa" / "extracted"
    assert sorted(p.name for p in extracted.iterdir()) == ["testdev_balanced_questions.json"]


@pytest.mark.parametrize(
    ("source", "image_dir", "n_rows"),
    [("vqav2-val", "images/val2014", 3), ("textvqa-val", "images/train_images", 2), ("gqa-testdev", "images", 3)],
)
def test_max_samples_keeps_a_seeded_subset_and_extracts_only_its_images(
    vqa_server, tmp_path, source, image_dir, n_rows
):
    assert DATASETS[source].downloads and DATASETS[source].tasks == ("vqa",)
    full = _prepare(vqa_server, source, tmp_path / "full")
    assert len(full) == n_rows
    a = _prepare(vqa_server, source, tmp_path / "a", max_samples=1)
    b = _prepare(vqa_server, source, tmp_path / "b", max_samples=1)
    assert len(a) == 1 and a.equals(b)
    assert a["sample_id"][0] in set(full["sample_id"])
    assert [p.name for p in (tmp_path / "a" / image_dir).iterdir()] == [a["image"][0].rsplit("/", 1)[1]]
    assert len(_prepare(vqa_server, source, tmp_path / "c", max_samples=n_rows - 1, seed=3)) == n_rows - 1


@pytest.mark.parametrize("source", ["vqav2-val", "textvqa-val", "gqa-testdev"])
def test_a_rerun_downloads_nothing(vqa_server, tmp_path, source):
    out = tmp_path / "resources" / "data" / "d"
    first = _prepare(vqa_server, source, out, default_raw=True)
    n = len(vqa_server.requests)
    assert n == len({path for path, _ in vqa_server.requests}) == (3 if source == "vqav2-val" else 2)
    assert _prepare(vqa_server, source, out, default_raw=True).equals(first)
    assert len(vqa_server.requests) == n
    assert (tmp_path / "resources" / "raw" / "d").is_dir()


def test_a_json_file_under_one_folder_is_found_too(http_server, tmp_path):
    _serve(http_server, vqav2=False, textvqa=False)
    http_server.files["questions1.2.zip"] = _zip(
        {"questions1.2/testdev_balanced_questions.json": json.dumps(GQA_QUESTIONS).encode()}
    )
    assert len(_prepare(http_server, "gqa-testdev", tmp_path / "gqa")) == 3


def test_a_missing_member_is_named(http_server, tmp_path):
    _serve(http_server)
    http_server.files["v2_Annotations_Val_mscoco.zip"] = _zip({"v2_mscoco_train2014_annotations.json": b"{}"})
    with pytest.raises(FileNotFoundError, match=r"v2_Annotations_Val_mscoco.zip has no member "):
        _prepare(http_server, "vqav2-val", tmp_path / "v")
    http_server.files["train_val_images.zip"] = _zip({"train_images/b0a1.jpg": _jpeg(1)})
    with pytest.raises(FileNotFoundError, match=r"train_val_images.zip lacks 1 image.*train_images/0c3f.jpg"):
        _prepare(http_server, "textvqa-val", tmp_path / "t")
    # GQA's archive keeps its images under images/; at the root they are not found.
    http_server.files["images.zip"] = _zip({"n161313.jpg": _jpeg(0), "n288870.jpg": _jpeg(1)})
    with pytest.raises(FileNotFoundError, match=r"images.zip lacks 2 image.*images/n161313.jpg"):
        _prepare(http_server, "gqa-testdev", tmp_path / "g")
    assert not (tmp_path / "g" / "test.parquet").exists()


def test_broken_records_are_named(http_server, tmp_path):
    _serve(http_server)
    http_server.files["v2_Annotations_Val_mscoco.zip"] = _zip(
        {"v2_mscoco_val2014_annotations.json": json.dumps({"annotations": VQAV2_ANNOTATIONS[:2]}).encode()}
    )
    with pytest.raises(ValueError, match=r"1 question\(s\) have no annotation, e.g. question_id \[42002\]"):
        _prepare(http_server, "vqav2-val", tmp_path / "v")
    broken = dict(GQA_QUESTIONS, **{"7": {"question": "Is it?", "imageId": "n1"}})  # a test question: no answer
    http_server.files["questions1.2.zip"] = _zip({"testdev_balanced_questions.json": json.dumps(broken).encode()})
    with pytest.raises(ValueError, match=r"GQA questions: a question record lacks the field 'answer'"):
        _prepare(http_server, "gqa-testdev", tmp_path / "g")
    http_server.files["TextVQA_0.5.1_val.json"] = json.dumps({"questions": TEXTVQA_DATA}).encode()
    with pytest.raises(ValueError, match=r"TextVQA: expected a JSON object with the key 'data', found \['questions'\]"):
        _prepare(http_server, "textvqa-val", tmp_path / "t")
