"""GenImage's BigGAN subset from a local folder in the published {train,val}/{ai,nature} layout."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from PIL import Image

from vlmopt.data import DATASETS
from vlmopt.data.synthetic import LABEL_NAMES
from vlmopt.pipeline import prepare_dataset

# Folder -> files; BigGAN's images are PNGs, the ImageNet ones JPEGs.
FILES = {
    "train/ai": ["116_biggan_00094.png", "000_biggan_00001.png"],
    "train/nature": ["n01440764_10026.JPEG", "n01443537_1029.JPEG", "n01530575_1000.JPEG"],
    "val/ai": ["001_biggan_00002.png"],
    "val/nature": ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000003.JPEG"],
}


def _local_copy(folder, files=FILES):
    for k, (sub, names) in enumerate(files.items()):
        (folder / sub).mkdir(parents=True)
        for i, name in enumerate(names):
            Image.new("RGB", (8, 8), (20 * k, 30 * i, 99)).save(folder / sub / name)
    (folder / "train" / "ai" / ".DS_Store").write_bytes(b"x")  # Not an image: ignored.
    if (folder / "val" / "nature").is_dir():
        (folder / "val" / "nature" / "readme.txt").write_text("not an image")
    return folder


def _prepare(out, **settings):
    prepare_dataset("genimage", {"source": "genimage-biggan", **settings}, out)


def test_genimage_biggan_converts_the_published_layout(tmp_path):
    local = _local_copy(tmp_path / "imagenet_ai_0419_biggan")
    out = tmp_path / "data"
    _prepare(out, path=str(local))
    assert LABEL_NAMES == ("real", "generated")
    train = pd.read_parquet(out / "train.parquet")
    assert list(train.columns) == ["sample_id", "image", "label", "label_name"]
    # nature (real, 0) first, then ai (generated, 1); files by name.
    assert list(train["sample_id"]) == [
        "train/nature/n01440764_10026.JPEG",
        "train/nature/n01443537_1029.JPEG",
        "train/nature/n01530575_1000.JPEG",
        "train/ai/000_biggan_00001.png",
        "train/ai/116_biggan_00094.png",
    ]
    assert list(train["label"]) == [0, 0, 0, 1, 1]
    assert list(train["label_name"]) == ["real"] * 3 + ["generated"] * 2
    assert list(train["image"]) == [f"images/train/{s.removeprefix('train/')}" for s in train["sample_id"]]
    # The subset's val folder is the test split; the val split is empty.
    test = pd.read_parquet(out / "test.parquet")
    assert list(test["sample_id"]) == [
        "val/nature/ILSVRC2012_val_00000001.JPEG",
        "val/nature/ILSVRC2012_val_00000003.JPEG",
        "val/ai/001_biggan_00002.png",
    ]
    assert list(test["image"])[2] == "images/test/ai/001_biggan_00002.png" and list(test["label"]) == [0, 0, 1]
    assert len(pd.read_parquet(out / "val.parquet")) == 0
    # Copies, byte for byte; nothing else under images/.
    for table in (train, test):
        for sid, rel in zip(table["sample_id"], table["image"], strict=True):
            assert (out / rel).read_bytes() == (local / sid).read_bytes() and not (out / rel).is_symlink()
    assert len([p for p in (out / "images").rglob("*") if p.is_file()]) == 8
    # A rerun copies nothing again; the copies survive the local folder's removal.
    before = {p: p.stat().st_ctime_ns for p in (out / "images").rglob("*") if p.is_file()}
    _prepare(out, path=str(local))
    assert {p: p.stat().st_ctime_ns for p in (out / "images").rglob("*") if p.is_file()} == before
    shutil.rmtree(local)
    assert all((out / rel).is_file() for rel in train["image"])


def test_max_samples_keeps_a_seeded_subset_per_split_and_copies_only_it(tmp_path):
    local = _local_copy(tmp_path / "local")
    spec = DATASETS["genimage-biggan"]
    assert (
        not spec.downloads
        and spec.options == ("path", "max_samples")
        and spec.tasks == ("classification", "real_vs_generated")
    )
    _prepare(tmp_path / "a", path=local)
    full = pd.read_parquet(tmp_path / "a" / "train.parquet")
    _prepare(tmp_path / "a", path=local, max_samples=2)
    _prepare(tmp_path / "b", path=local, max_samples=2)
    for split in ("train", "test"):
        a, b = (pd.read_parquet(tmp_path / x / f"{split}.parquet") for x in "ab")
        assert len(a) == 2 and a.equals(b)
    a = pd.read_parquet(tmp_path / "a" / "train.parquet")
    assert a.equals(full[full["sample_id"].isin(a["sample_id"])].reset_index(drop=True))
    # The full run's other copies were removed.
    kept = sorted(
        p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a" / "images").rglob("*") if p.is_file()
    )
    test = pd.read_parquet(tmp_path / "a" / "test.parquet")
    assert kept == sorted([*a["image"], *test["image"]])


def test_a_missing_path_or_broken_layout_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="needs the setting 'path'"):
        _prepare(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        _prepare(tmp_path / "out", path=tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['mirror'\]"):
        _prepare(tmp_path / "out", path=tmp_path, mirror="http://example.org")
    broken = _local_copy(tmp_path / "broken", {k: v for k, v in FILES.items() if k != "val/nature"})
    with pytest.raises(FileNotFoundError, match=r"val/nature' is missing"):
        _prepare(tmp_path / "out", path=broken)
    (broken / "val" / "nature").mkdir()
    with pytest.raises(FileNotFoundError, match=r"val/nature' holds no images"):
        _prepare(tmp_path / "out", path=broken)
    # The dataset folder must not hold the local copy (stale-file removal would delete it).
    inside = _local_copy(tmp_path / "out2" / "images" / "copy")
    with pytest.raises(ValueError, match="lies inside the dataset's image folder"):
        _prepare(tmp_path / "out2", path=inside)
    assert (inside / "train" / "ai" / "000_biggan_00001.png").is_file()
