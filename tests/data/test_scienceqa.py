"""ScienceQA's image questions from a copy of derek-thomas/ScienceQA in the hub's layout, read offline."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.data.test_hub import hf_offline, image_bytes, write_hub_parquet  # noqa: F401 (fixture)
from vlmopt.data import DATASETS, write_table
from vlmopt.data.scienceqa import scienceqa_prompt
from vlmopt.data.sources import deterministic_subset

pytestmark = pytest.mark.usefixtures("hf_offline")

TEXT_COLUMNS = ("question", "hint", "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")


def _features():
    import datasets

    # As the dataset card (dataset_info) of derek-thomas/ScienceQA declares them.
    return datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "choices": datasets.Sequence(datasets.Value("string")),
            "answer": datasets.Value("int8"),
            **{c: datasets.Value("string") for c in TEXT_COLUMNS if c != "question"},
        }
    )


def _q(image, question, choices, answer, hint="", subject="natural science"):
    return {
        "image": None if image is None else {"bytes": image, "path": "image.png"},
        "question": question,
        "choices": choices,
        "answer": answer,
        "hint": hint,
        "task": "closed choice",
        "grade": "grade4",
        "subject": subject,
        "topic": "geography",
        "category": "Geography",
        "skill": "Read a map",
        "lecture": "A lecture.",
        "solution": "A solution.",
    }


def _columns(questions):
    return {key: [q[key] for q in questions] for key in _features()}


PNGS = [image_bytes((30 * i, 60, 90)) for i in range(8)]
TRAIN = [
    _q(PNGS[0], "Which state is highlighted?", ["Ohio", "Texas", "Maine"], 2),
    _q(None, "Which word is a noun?", ["run", "dog"], 1, subject="language science"),  # no image: left out
    _q(PNGS[1], "Which is a compound?", ["water ", "neon"], 0, hint="Look at the models.\nThey show atoms."),
    _q(PNGS[2], "What is the capital of Utah?", ["Salt Lake City", "Provo", "Ogden", "Logan", "Moab"], 3),
    _q(PNGS[3], "Which country is shown?", ["Fiji", "Tonga"], 1, subject="social science"),
    _q(PNGS[4], "Which animal is a mammal?", ["frog", "bat"], 1, hint="  "),
]
VALIDATION = [_q(PNGS[5], "Which ocean is shown?", ["Pacific", "Atlantic"], 0)]
TEST = [
    _q(None, "Which is longer?", ["a mile", "an inch"], 0),
    _q(PNGS[6], "Which continent is shown?", ["Asia", "Africa", "Europe"], 1, subject=""),
]
INSTRUCTION = "Answer with the option's letter from the given choices directly."


@pytest.fixture
def sqa_copy(tmp_path):
    folder = tmp_path / "ScienceQA"
    write_hub_parquet(
        folder,
        {
            "train-00000-of-00001-1028f23e353fbe3e.parquet": _columns(TRAIN),
            "validation-00000-of-00001-6c7328ff6c84284c.parquet": _columns(VALIDATION),
            "test-00000-of-00001-f0e719df791966ff.parquet": _columns(TEST),
        },
        _features(),
    )
    return folder


def _prepare(out, hub_id, **settings):
    return DATASETS["scienceqa"].prepare(out, seed=0, hub_id=str(hub_id), **settings)


def test_scienceqa_keeps_image_questions_with_llava_style_prompts(sqa_copy, tmp_path):
    out = tmp_path / "out"
    _prepare(out, sqa_copy)
    train = pd.read_parquet(out / "train.parquet")
    assert list(train.columns) == [
        "sample_id",
        "image",
        "question",
        "answers",
        "answer_type",
        "choices",
        "answer_index",
    ]
    assert list(train["sample_id"]) == ["train-0", "train-2", "train-3", "train-4", "train-5"]
    assert list(train["image"]) == [f"images/train/{i}.png" for i in (0, 2, 3, 4, 5)]
    assert train["question"][0] == f"Which state is highlighted?\nA. Ohio\nB. Texas\nC. Maine\n{INSTRUCTION}"
    assert train["question"][1] == (
        f"Context: Look at the models.\nThey show atoms.\nWhich is a compound?\nA. water\nB. neon\n{INSTRUCTION}"
    )
    assert train["question"][2].endswith(f"D. Logan\nE. Moab\n{INSTRUCTION}")
    assert train["question"][4].startswith("Which animal is a mammal?\n")  # a blank hint adds no context line
    assert [list(a) for a in train["answers"]] == [["Maine"], ["water"], ["Logan"], ["Tonga"], ["bat"]]
    assert list(train["answer_index"]) == [2, 0, 3, 1, 1]
    assert [list(c) for c in train["choices"]][1] == ["water", "neon"]
    assert list(train["answer_type"]) == [
        "natural science",
        "natural science",
        "natural science",
        "social science",
        "natural science",
    ]
    assert str(train["answer_index"].dtype) == "int64"

    val, test = pd.read_parquet(out / "val.parquet"), pd.read_parquet(out / "test.parquet")
    assert list(val["sample_id"]) == ["validation-0"]
    assert list(test["sample_id"]) == ["test-1"]  # test-0 has no image
    assert list(test["answer_type"]) == ["multiple choice"]  # blank subject
    assert list(test["image"]) == ["images/test/1.png"]
    images = {"train": [TRAIN[i]["image"]["bytes"] for i in (0, 2, 3, 4, 5)], "val": [PNGS[5]], "test": [PNGS[6]]}
    for split, table in (("train", train), ("val", val), ("test", test)):
        assert [(out / rel).read_bytes() for rel in table["image"]] == images[split]
    written = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file())
    assert written == sorted([*train["image"], *val["image"], *test["image"]])


def test_scienceqa_prompt_format():
    assert scienceqa_prompt("Q?", ["x", "y"], " A hint. ") == f"Context: A hint.\nQ?\nA. x\nB. y\n{INSTRUCTION}"
    assert scienceqa_prompt("Q?", ["x"], None) == f"Q?\nA. x\n{INSTRUCTION}"


def test_max_samples_keeps_a_seeded_subset_of_the_image_questions(sqa_copy, tmp_path):
    full, out = tmp_path / "full", tmp_path / "sub"
    _prepare(full, sqa_copy)
    _prepare(out, sqa_copy, max_samples=3)
    train = pd.read_parquet(out / "train.parquet")
    expected = deterministic_subset(pd.read_parquet(full / "train.parquet"), 3, seed=0)
    assert list(train["sample_id"]) == list(expected["sample_id"])
    pd.testing.assert_frame_equal(train, expected)
    first = (out / "train.parquet").read_bytes()
    _prepare(out, sqa_copy, max_samples=3)
    assert (out / "train.parquet").read_bytes() == first
    assert sorted(p.name for p in (out / "images" / "train").iterdir()) == sorted(
        rel.rsplit("/", 1)[1] for rel in train["image"]
    )


def test_a_save_to_disk_copy_gives_identical_tables(sqa_copy, tmp_path):
    import datasets

    datasets.load_dataset(str(sqa_copy)).save_to_disk(str(tmp_path / "saved"))
    _prepare(tmp_path / "a", sqa_copy)
    _prepare(tmp_path / "b", tmp_path / "saved")
    for split in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{split}.parquet").read_bytes() == (tmp_path / "b" / f"{split}.parquet").read_bytes()


def test_a_missing_column_or_split_or_a_bad_answer_is_an_error_naming_it(tmp_path):
    import datasets

    no_choices = tmp_path / "no-choices"
    features = datasets.Features({k: v for k, v in _features().items() if k != "choices"})
    columns = {k: v for k, v in _columns(VALIDATION).items() if k != "choices"}
    write_hub_parquet(
        no_choices, {f"{s}-00000-of-00001.parquet": columns for s in ("train", "validation", "test")}, features
    )
    with pytest.raises(ValueError, match=r"split 'train', lacks column\(s\) \['choices'\]; its columns are"):
        _prepare(tmp_path / "out", no_choices)

    no_test = tmp_path / "no-test"
    write_hub_parquet(
        no_test, {f"{s}-00000-of-00001.parquet": _columns(VALIDATION) for s in ("train", "validation")}, _features()
    )
    with pytest.raises(ValueError, match=r"has no split 'test'; its splits are \['train', 'validation'\]"):
        _prepare(tmp_path / "out", no_test)

    bad = tmp_path / "bad-answer"
    rows = _columns([_q(PNGS[0], "Q?", ["x", "y"], 2)])
    write_hub_parquet(bad, {f"{s}-00000-of-00001.parquet": rows for s in ("train", "validation", "test")}, _features())
    with pytest.raises(ValueError, match=r"split 'train', row 0: 'answer' 2 is not the index of one of its 2 choices"):
        _prepare(tmp_path / "out", bad)


def test_the_schema_checks_answer_index_against_choices(tmp_path):
    row = {
        "sample_id": ["q"],
        "image": ["images/q.png"],
        "question": ["Q?"],
        "answers": [["x"]],
        "answer_type": ["multiple choice"],
        "choices": [["x", "y"]],
    }
    write_table(pd.DataFrame({**row, "answer_index": [1]}), tmp_path / "ok.parquet", tasks=("vqa",))
    with pytest.raises(ValueError, match=r"'answer_index' must index into 'choices'; row 0 has 2 for 2 choice"):
        write_table(pd.DataFrame({**row, "answer_index": [2]}), tmp_path / "bad.parquet", tasks=("vqa",))
    with pytest.raises(ValueError, match=r"column 'answer_index' must hold integers"):
        write_table(pd.DataFrame({**row, "answer_index": ["1"]}), tmp_path / "bad.parquet", tasks=("vqa",))
    with pytest.raises(ValueError, match=r"column 'choices' must hold non-empty lists"):
        write_table(pd.DataFrame({**row, "choices": [[]], "answer_index": [0]}), tmp_path / "bad.parquet")
