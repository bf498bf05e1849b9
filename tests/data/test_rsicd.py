"""RSICD from a copy of arampacha/rsicd in the hub's layout (and a save_to_disk copy), read offline."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.data.test_hub import hf_offline, image_bytes, write_hub_parquet  # noqa: F401 (fixture)
from vlmopt.data import DATASETS
from vlmopt.data.sources import deterministic_subset

pytestmark = pytest.mark.usefixtures("hf_offline")


def _features():
    import datasets

    # As dataset_infos.json of arampacha/rsicd declares them.
    return datasets.Features(
        {
            "filename": datasets.Value("string"),
            "captions": datasets.Sequence(datasets.Value("string")),
            "image": datasets.Image(),
        }
    )


def _rows(*records):
    return {
        "filename": [r[0] for r in records],
        "captions": [r[1] for r in records],
        "image": [{"bytes": r[2], "path": r[3]} for r in records],
    }


JPEGS = [image_bytes((20 * i, 100, 200 - 10 * i), fmt="JPEG") for i in range(8)]
TRAIN = [
    ("airport_1.jpg", ["Many planes are parked  near a terminal. ", "  ", "An airport\nwith runways."], JPEGS[0], None),
    ("00002.jpg", ["   ", ""], JPEGS[1], None),  # only blank captions: left out
    ("beach_3.jpg", ["A beach."], JPEGS[2], "beach_3.jpg"),
    ("farmland_4.jpg", ["Green fields.", "Fields."], JPEGS[3], None),
    ("forest_5.jpg", ["Dense trees."], JPEGS[4], None),
    ("port_6.jpg", ["Boats in a port."], JPEGS[5], None),
]
VALID = [("river_7.jpg", ["A river crosses the city."], JPEGS[6], None)]
TEST = [("stadium_8.jpg", ["A stadium.", "A round stadium."], JPEGS[7], None)]


@pytest.fixture
def rsicd_copy(tmp_path):
    folder = tmp_path / "rsicd"
    write_hub_parquet(
        folder,
        {
            "train-00000-of-00001.parquet": _rows(*TRAIN),
            "valid-00000-of-00001.parquet": _rows(*VALID),
            "test-00000-of-00001.parquet": _rows(*TEST),
        },
        _features(),
    )
    return folder


def _prepare(out, hub_id, **settings):
    return DATASETS["rsicd"].prepare(out, seed=0, hub_id=str(hub_id), **settings)


def test_rsicd_writes_captions_and_the_original_image_bytes(rsicd_copy, tmp_path):
    out = tmp_path / "out"
    paths = _prepare(out, rsicd_copy)
    assert sorted(paths) == ["test", "train", "val"]
    train = pd.read_parquet(out / "train.parquet")
    assert list(train.columns) == ["sample_id", "image", "references", "captions"]
    assert list(train["sample_id"]) == ["airport_1.jpg", "beach_3.jpg", "farmland_4.jpg", "forest_5.jpg", "port_6.jpg"]
    assert list(train["image"]) == [
        "images/train/airport_1.jpg",
        "images/train/beach_3.jpg",
        "images/train/farmland_4.jpg",
        "images/train/forest_5.jpg",
        "images/train/port_6.jpg",
    ]
    assert [list(r) for r in train["references"]] == [
        ["Many planes are parked near a terminal.", "An airport with runways."],
        ["A beach."],
        ["Green fields.", "Fields."],
        ["Dense trees."],
        ["Boats in a port."],
    ]
    assert [list(c) for c in train["captions"]] == [list(r) for r in train["references"]]
    val, test = pd.read_parquet(out / "val.parquet"), pd.read_parquet(out / "test.parquet")
    assert list(val["sample_id"]) == ["river_7.jpg"] and list(val["image"]) == ["images/val/river_7.jpg"]
    assert [list(r) for r in test["references"]] == [["A stadium.", "A round stadium."]]
    by_name = {r[0]: r[2] for r in TRAIN + VALID + TEST}
    for table in (train, val, test):
        for sample_id, rel in zip(table["sample_id"], table["image"], strict=True):
            assert (out / rel).read_bytes() == by_name[sample_id]
    written = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file())
    assert written == sorted([*train["image"], *val["image"], *test["image"]])


def test_a_save_to_disk_copy_gives_identical_tables(rsicd_copy, tmp_path):
    import datasets

    dd = datasets.load_dataset(str(rsicd_copy))
    dd.save_to_disk(str(tmp_path / "saved"))
    _prepare(tmp_path / "a", rsicd_copy)
    _prepare(tmp_path / "b", tmp_path / "saved")
    for split in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{split}.parquet").read_bytes() == (tmp_path / "b" / f"{split}.parquet").read_bytes()


def test_max_samples_keeps_a_seeded_subset_and_writes_only_its_images(rsicd_copy, tmp_path):
    full = tmp_path / "full"
    _prepare(full, rsicd_copy)
    out = tmp_path / "sub"
    _prepare(out, rsicd_copy, max_samples=2)
    train = pd.read_parquet(out / "train.parquet")
    expected = deterministic_subset(pd.read_parquet(full / "train.parquet"), 2, seed=0)
    assert list(train["sample_id"]) == list(expected["sample_id"]) and len(train) == 2
    assert len(pd.read_parquet(out / "val.parquet")) == 1
    first = (out / "train.parquet").read_bytes()
    _prepare(out, rsicd_copy, max_samples=2)
    assert (out / "train.parquet").read_bytes() == first
    written = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file())
    assert written == sorted([*train["image"], "images/val/river_7.jpg", "images/test/stadium_8.jpg"])
    # A later run with fewer samples leaves no images of the earlier one behind.
    _prepare(full, rsicd_copy, max_samples=1)
    assert len([p for p in (full / "images" / "train").iterdir()]) == 1


def test_a_missing_column_or_split_is_an_error_naming_it(tmp_path):
    import datasets

    no_captions = tmp_path / "no-captions"
    features = datasets.Features({"filename": datasets.Value("string"), "image": datasets.Image()})
    rows = {"filename": ["a.jpg"], "image": [{"bytes": JPEGS[0], "path": None}]}
    write_hub_parquet(
        no_captions,
        {f"{s}-00000-of-00001.parquet": rows for s in ("train", "valid", "test")},
        features,
    )
    with pytest.raises(ValueError, match=r"split 'train', lacks column\(s\) \['captions'\]; its columns are"):
        _prepare(tmp_path / "out", no_captions)

    no_valid = tmp_path / "no-valid"
    write_hub_parquet(
        no_valid,
        {f"{s}-00000-of-00001.parquet": _rows(*TEST) for s in ("train", "test")},
        _features(),
    )
    with pytest.raises(ValueError, match=r"has no split 'valid' or 'validation'; its splits are \['test', 'train'\]"):
        _prepare(tmp_path / "out", no_valid)


def test_unknown_settings_are_rejected():
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['path'\]; allowed: \['hub_id', 'max_samples'\]"):
        DATASETS["rsicd"].prepare("unused", path="x")
