"""The synthetic shapes dataset: what its images show agrees with its texts, and it is reproducible."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, deque
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vlmopt.data import DATASETS, dataset_texts, make_shapes, read_split
from vlmopt.data.synthetic import ANSWER_TYPES, COLORS, COUNT_WORDS, POSITIONS, QUESTION_TYPES, SHAPES

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def tables(shapes_root) -> dict[str, pd.DataFrame]:
    return {split: read_split(shapes_root, split, ["captioning", "vqa", "classification"]) for split in SPLITS}


def _blobs(pixels: np.ndarray) -> list[np.ndarray]:
    """Connected (4-neighbour) groups of saturated pixels, each as an array of (row, col)."""
    mask = (pixels.max(axis=2).astype(int) - pixels.min(axis=2)) > 60
    seen = np.zeros_like(mask)
    blobs = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, members = deque([start]), []
        while queue:
            r, c = queue.popleft()
            members.append((r, c))
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        blobs.append(np.array(members))
    return blobs


def _vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQA accuracy (answers already normalised): mean over leave-one-out of min(1, matches/3)."""
    scores = [min(1.0, sum(a == prediction for j, a in enumerate(answers) if j != i) / 3) for i in range(len(answers))]
    return sum(scores) / len(scores)


def _checker_response(pixels: np.ndarray) -> float:
    """Mean background brightness times a +/-1 checkerboard of 2x2 cells: ~8 with the artefact, ~0 without."""
    grey = pixels.astype(float).mean(axis=2)
    ii, jj = np.indices(grey.shape)
    pattern = np.where((ii // 2 + jj // 2) % 2 == 0, 1.0, -1.0)
    background = (pixels.max(axis=2).astype(int) - pixels.min(axis=2)) <= 60
    return float((grey * pattern)[background].mean() - grey[background].mean() * pattern[background].mean())


def test_layout_ids_and_paths(shapes_root, tables):
    assert {s: len(t) for s, t in tables.items()} == {"train": 64, "val": 8, "test": 24}
    for split, df in tables.items():
        assert list(df["sample_id"]) == [f"shapes-{split}-{i:05d}" for i in range(len(df))]
        assert list(df["image"]) == [f"images/{split}/{sid}.png" for sid in df["sample_id"]]
        assert sorted(p.name for p in (shapes_root / "images" / split).iterdir()) == [
            f"{s}.png" for s in df["sample_id"]
        ]
    assert not list(Path(shapes_root).glob(".*tmp"))


def test_images_show_what_the_metadata_says(shapes_root, tables):
    """Count, colour, shape and position read back from the pixels of every test and val image."""
    df = pd.concat([tables["test"], tables["val"]], ignore_index=True)
    fill_ratio = {"square": (0.95, 1.01), "circle": (0.65, 0.9), "triangle": (0.4, 0.65)}
    for row in df.itertuples():
        pixels = np.asarray(Image.open(shapes_root / row.image))
        assert pixels.shape == (64, 64, 3)
        blobs = _blobs(pixels)
        assert len(blobs) == row.count, row.sample_id
        for blob in blobs:
            colours = {tuple(int(v) for v in pixels[r, c]) for r, c in blob}
            assert colours == {COLORS[row.color]}, row.sample_id
            height, width = np.ptp(blob, axis=0) + 1
            assert height == width
            low, high = fill_ratio[row.shape]
            assert low <= len(blob) / (height * width) <= high, (row.sample_id, row.shape)
        cy, cx = np.concatenate(blobs).mean(axis=0) / 64
        central = 0.4 < cx < 0.6 and 0.4 < cy < 0.6
        where = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6, "center": central}
        assert where[row.position], (row.sample_id, row.position, cx, cy)


def test_generated_images_carry_the_checkerboard_and_real_ones_do_not(shapes_root, tables):
    df = tables["train"]
    response = np.array([_checker_response(np.asarray(Image.open(shapes_root / p))) for p in df["image"]])
    assert np.all(response[df["label"] == 1] > 6)
    assert np.all(np.abs(response[df["label"] == 0]) < 1)
    assert set(zip(df["label"], df["label_name"], strict=True)) == {(0, "real"), (1, "generated")}


def test_references_are_five_distinct_well_formed_captions(tables):
    for df in tables.values():
        for row in df.itertuples():
            refs = list(row.references)
            assert len(refs) == len(set(refs)) == 5
            noun = row.shape if row.count == 1 else row.shape + "s"
            for ref in refs:
                words = ref.split()
                assert re.fullmatch(r"[a-z]+( [a-z]+)*", ref) and len(words) >= 4, ref
                assert COUNT_WORDS[row.count] in words and row.color in words and noun in words, ref
                wrong_number = {row.shape + "s", "are"} if row.count == 1 else {row.shape, "is"}
                assert not wrong_number & set(words), ref
                place = {row.position, "middle" if row.position == "center" else row.position}
                assert place & set(words), ref
            assert refs[0].split()[:3] == [COUNT_WORDS[row.count], row.color, noun]


def test_question_types_labels_and_yes_no_are_balanced_in_every_split(tables):
    for split, df in tables.items():
        n = len(df)
        counts = Counter(df["question_type"])
        assert set(counts) == set(QUESTION_TYPES), split
        assert max(counts.values()) - min(counts.values()) <= 1, (split, counts)
        labels = Counter(df["label"])
        assert abs(labels[0] - labels[1]) <= 1 and labels[0] + labels[1] == n, (split, labels)
        yes_no = Counter(Counter(a).most_common(1)[0][0] for a in df.loc[df["question_type"] == "yes/no", "answers"])
        assert set(yes_no) <= {"yes", "no"} and abs(yes_no["yes"] - yes_no["no"]) <= 1, (split, yes_no)
    assert set(Counter(tables["train"]["question_type"]).values()) == {16}


def test_answers_are_vqav2_style_and_the_correct_one_scores_full_marks(tables):
    df = pd.concat(tables.values(), ignore_index=True)
    partial_credit = 0
    for row in df.itertuples():
        answers = list(row.answers)
        assert len(answers) == 10 and all(isinstance(a, str) and a for a in answers)
        assert row.answer_type == ANSWER_TYPES[row.question_type]
        if row.question_type == "color":
            correct = row.color
        elif row.question_type == "count":
            correct = str(row.count)
        elif row.question_type == "shape":
            correct = row.shape
        else:
            asked = re.fullmatch(r"is there an? (\w+) (\w+)\?", row.question)
            assert asked, row.question
            assert asked.group(1) in COLORS and asked.group(2) in SHAPES
            correct = "yes" if asked.groups() == (row.color, row.shape) else "no"
        top, n_top = Counter(answers).most_common(1)[0]
        assert top == correct and n_top >= 7, (row.sample_id, answers)
        assert _vqa_accuracy(correct, answers) == 1.0
        partial_credit += any(0 < _vqa_accuracy(a, answers) < 1 for a in set(answers) - {correct})
    # Near misses exist and earn partial credit, so min(1, matches/3) matters.
    assert partial_credit >= 10
    assert (df["answers"].map(lambda a: len(set(a))) > 1).mean() > 0.5


def test_questions_agree_in_number_with_the_image(tables):
    templates = {
        "color": {
            1: "what color is the shape?",
            2: "what color are the shapes?",
            3: "what color are the shapes?",
        },
        "count": dict.fromkeys((1, 2, 3), "how many shapes are there?"),
        "shape": dict.fromkeys((1, 2, 3), "what shape is shown?"),
    }
    for df in tables.values():
        for row in df.itertuples():
            if row.question_type == "yes/no":
                pattern = r"is there (a [b-df-hj-np-tv-z]\w*|an [aeiou]\w*) \w+\?"
                assert re.fullmatch(pattern, row.question), row.question
            else:
                assert row.question == templates[row.question_type][row.count]


def test_vocabulary_is_small_and_lowercase(tables):
    texts = [t for df in tables.values() for t in dataset_texts(df)]
    words = {w for t in texts for w in t.replace("?", " ?").split()}
    assert all(re.fullmatch(r"[a-z0-9?]+", w) for w in words)
    assert len(words) <= 60
    assert {"red", "circles", "three", "left", "3", "yes"} <= words


def test_same_seed_gives_identical_bytes_and_splits_are_independent(tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a = make_shapes(tmp_path / "a", seed=3, n_train=12, n_val=4, n_test=8)
    make_shapes(tmp_path / "b", seed=3, n_train=12, n_val=4, n_test=8)
    assert set(a) == set(SPLITS) and a["test"] == tmp_path / "a" / "test.parquet"
    same_a, same_b = files(tmp_path / "a"), files(tmp_path / "b")
    assert len(same_a) == 24 + 3 and same_a == same_b

    # A different n_train leaves val and test as they were; a different seed changes them.
    make_shapes(tmp_path / "c", seed=3, n_train=20, n_val=4, n_test=8)
    other = files(tmp_path / "c")
    assert all(other[k] == v for k, v in same_a.items() if not k.startswith(("train", "images/train")))
    assert other["train.parquet"] != same_a["train.parquet"]
    make_shapes(tmp_path / "d", seed=4, n_train=12, n_val=4, n_test=8)
    assert files(tmp_path / "d")["test.parquet"] != same_a["test.parquet"]


def test_regenerating_smaller_drops_stale_images(tmp_path):
    make_shapes(tmp_path, n_train=10, n_val=0, n_test=2)
    make_shapes(tmp_path, n_train=4, n_val=0, n_test=2)
    assert len(list((tmp_path / "images" / "train").iterdir())) == 4
    assert len(read_split(tmp_path, "val")) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 8}, "image_size must be an integer >= 32"),
        ({"n_train": -1}, "n_train must be a non-negative"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_shapes(tmp_path, **kwargs)


def test_other_image_sizes(tmp_path):
    make_shapes(tmp_path, n_train=0, n_val=0, n_test=12, image_size=32)
    df = read_split(tmp_path, "test")
    for row in df.itertuples():
        pixels = np.asarray(Image.open(tmp_path / row.image))
        assert pixels.shape == (32, 32, 3)
        assert len(_blobs(pixels)) == row.count


def test_registry_prepares_shapes_and_rejects_unknown_settings(tmp_path):
    spec = DATASETS["shapes"]
    assert spec.source == "synthetic" and set(spec.tasks) == {
        "captioning",
        "vqa",
        "classification",
        "retrieval",
        "real_vs_generated",
    }
    paths = spec.prepare(tmp_path, seed=1, n_train=4, n_val=2, n_test=2)
    assert sorted(paths) == sorted(SPLITS) and all(p.is_file() for p in paths.values())
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['n_tain'\]; allowed: \['n_train'"):
        spec.prepare(tmp_path, n_tain=4)


def test_retrieval_captions_are_the_references(tables):
    for table in tables.values():
        assert [list(c) for c in table["captions"]] == [list(r) for r in table["references"]]


def test_positions_all_appear(tables):
    assert set(tables["train"]["position"]) == set(POSITIONS)
    assert set(tables["train"]["color"]) == set(COLORS)
    assert set(tables["train"]["shape"]) == set(SHAPES)
    assert set(tables["train"]["count"]) == {1, 2, 3}


def test_data_package_does_not_import_torch():
    code = "import sys, vlmopt.data, vlmopt.data.synthetic, vlmopt.data.schema; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
