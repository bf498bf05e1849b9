"""ImageNet-1k validation from a local folder: class folders named by wnid and LOC_synset_mapping.txt."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image

from vlmopt.data import DATASETS
from vlmopt.pipeline import prepare_dataset

# As in the Kaggle file, but out of wnid order: labels follow the sorted wnids, not the lines.
MAPPING = """n03126707 crane
n01440764 tench, Tinca tinca
n02012849 crane
n01443537 goldfish, Carassius auratus
"""
# Sorted wnids: n01440764 (0), n01443537 (1), n02012849 (2), n03126707 (3); goldfish has no folder.
FOLDERS = {
    "n03126707": ["ILSVRC2012_val_00000004.JPEG"],
    "n01440764": ["ILSVRC2012_val_00000293.JPEG", "ILSVRC2012_val_00002138.JPEG"],
    "n02012849": ["ILSVRC2012_val_00000001.JPEG"],
}


def _local_copy(folder, folders=FOLDERS, mapping=MAPPING):
    folder.mkdir(parents=True)
    if mapping is not None:
        (folder / "LOC_synset_mapping.txt").write_text(mapping)
    (folder / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")  # Other Kaggle files are ignored.
    for k, (wnid, names) in enumerate(folders.items()):
        (folder / wnid).mkdir()
        for i, name in enumerate(names):
            Image.new("RGB", (8, 8), (40 * k, 50 * i, 7)).save(folder / wnid / name, format="JPEG")
    return folder


def _prepare(out, **settings):
    prepare_dataset("imagenet", {"source": "imagenet-val", **settings}, out)


def test_imagenet_val_converts_the_class_folder_layout(tmp_path):
    local = _local_copy(tmp_path / "imagenet")
    out = tmp_path / "data"
    _prepare(out, path=str(local), templates=["itap of a {}."])
    test = pd.read_parquet(out / "test.parquet")
    assert list(test.columns) == ["sample_id", "image", "label", "label_name"]
    # Class folders by wnid, files by name.
    assert list(test["sample_id"]) == [
        "ILSVRC2012_val_00000293",
        "ILSVRC2012_val_00002138",
        "ILSVRC2012_val_00000001",
        "ILSVRC2012_val_00000004",
    ]
    assert list(test["label"]) == [0, 0, 2, 3]
    assert list(test["label_name"]) == ["tench", "tench", "crane", "crane"]
    assert list(test["image"]) == [
        "images/test/n01440764/ILSVRC2012_val_00000293.JPEG",
        "images/test/n01440764/ILSVRC2012_val_00002138.JPEG",
        "images/test/n02012849/ILSVRC2012_val_00000001.JPEG",
        "images/test/n03126707/ILSVRC2012_val_00000004.JPEG",
    ]
    for rel in test["image"]:
        assert (out / rel).read_bytes() == (local / rel.removeprefix("images/test/")).read_bytes()
    for split in ("train", "val"):
        assert len(pd.read_parquet(out / f"{split}.parquet")) == 0
    # A rerun copies nothing again.
    before = {p: p.stat().st_ctime_ns for p in (out / "images").rglob("*") if p.is_file()}
    _prepare(out, path=str(local))
    assert {p: p.stat().st_ctime_ns for p in (out / "images").rglob("*") if p.is_file()} == before


def test_max_samples_keeps_a_seeded_subset_and_copies_only_it(tmp_path):
    local = _local_copy(tmp_path / "imagenet")
    spec = DATASETS["imagenet-val"]
    assert not spec.downloads and spec.options == ("path", "max_samples") and spec.tasks == ("classification",)
    _prepare(tmp_path / "a", path=local)
    full = pd.read_parquet(tmp_path / "a" / "test.parquet")
    _prepare(tmp_path / "a", path=local, max_samples=3)
    _prepare(tmp_path / "b", path=local, max_samples=3)
    a, b = pd.read_parquet(tmp_path / "a" / "test.parquet"), pd.read_parquet(tmp_path / "b" / "test.parquet")
    assert len(a) == 3 and a.equals(b)
    assert a.equals(full[full["sample_id"].isin(a["sample_id"])].reset_index(drop=True))
    kept = sorted(
        p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a" / "images").rglob("*") if p.is_file()
    )
    assert kept == sorted(a["image"])


def test_a_missing_mapping_unknown_wnid_or_broken_layout_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="needs the setting 'path'"):
        _prepare(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="LOC_synset_mapping.txt' is missing"):
        _prepare(tmp_path / "out", path=_local_copy(tmp_path / "no-mapping", mapping=None))
    unknown = _local_copy(tmp_path / "unknown", {**FOLDERS, "n09999999": ["ILSVRC2012_val_00000009.JPEG"]})
    with pytest.raises(ValueError, match=r"\['n09999999'\] .* are not wnids of LOC_synset_mapping.txt"):
        _prepare(tmp_path / "out", path=unknown)
    with pytest.raises(ValueError, match=r"LOC_synset_mapping.txt:2: expected"):
        _prepare(tmp_path / "out", path=_local_copy(tmp_path / "bad-line", mapping="n01440764 tench\nn0144 goldfish\n"))
    loose = _local_copy(tmp_path / "loose", {})
    Image.new("RGB", (8, 8)).save(loose / "ILSVRC2012_val_00000001.JPEG", format="JPEG")
    with pytest.raises(FileNotFoundError, match="no class folders .* 1 loose images"):
        _prepare(tmp_path / "out", path=loose)
    twice = _local_copy(
        tmp_path / "twice",
        {"n01440764": ["ILSVRC2012_val_00000001.JPEG"], "n02012849": ["ILSVRC2012_val_00000001.JPEG"]},
    )
    with pytest.raises(ValueError, match="'ILSVRC2012_val_00000001' is in both n01440764 and n02012849"):
        _prepare(tmp_path / "out", path=twice)
