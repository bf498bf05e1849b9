"""ImageNetV2 matched-frequency from a tar.gz in the published layout (class-index folders), over loopback."""

from __future__ import annotations

import io
import tarfile

import pandas as pd
import pytest
from PIL import Image

from vlmopt.data import DATASETS
from vlmopt.pipeline import prepare_dataset

FOLDER = "imagenetv2-matched-frequency-format-val"
# 1,000 classes listed in reverse wnid order: class index i is the i-th wnid in sorted order.
WNIDS = [f"n{1440764 + 7 * i:08d}" for i in range(1000)]
MAPPING = "".join(f"{w} name{i}, other name\n" for i, w in reversed(list(enumerate(WNIDS))))
# Folder "10" sorts before "2" as text; labels follow the numbers.
IMAGES = {"0": ["7e1f.jpeg", "0a3c.jpeg"], "2": ["5b2d.jpeg"], "10": ["0a3c.jpeg"], "999": ["ffee.jpeg"]}


def _tar(members: dict[str, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _jpeg(k: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (k * 20, 9, 9)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _archive(images=IMAGES, prefix="") -> bytes:
    members: dict[str, bytes | None] = {f"{prefix}{FOLDER}": None}
    for folder, files in images.items():
        members[f"{prefix}{FOLDER}/{folder}"] = None
        for k, name in enumerate(files):
            members[f"{prefix}{FOLDER}/{folder}/{name}"] = _jpeg(k)
    members[f"{prefix}{FOLDER}/0/.DS_Store"] = b"x"  # not an image: ignored
    return _tar(members)


@pytest.fixture
def server(http_server):
    http_server.files["imagenetv2-matched-frequency.tar.gz"] = _archive()
    return http_server


@pytest.fixture
def classes(tmp_path):
    path = tmp_path / "LOC_synset_mapping.txt"
    path.write_text(MAPPING)
    return path


def _prepare(server, out, raw, **settings):
    prepare_dataset("v2", {"source": "imagenetv2", "mirror": server.url(""), **settings}, out, raw_dir=raw)


@pytest.mark.parametrize("prefix", ["", "./"])
def test_imagenetv2_converts_the_published_layout(server, classes, tmp_path, prefix):
    server.files["imagenetv2-matched-frequency.tar.gz"] = _archive(prefix=prefix)
    out, raw = tmp_path / "v2", tmp_path / "raw"
    _prepare(server, out, raw, classes=str(classes), templates=["a photo of a {}."])
    test = pd.read_parquet(out / "test.parquet")
    assert list(test.columns) == ["sample_id", "image", "label", "label_name"]
    assert list(test["sample_id"]) == ["0/0a3c", "0/7e1f", "2/5b2d", "10/0a3c", "999/ffee"]
    assert list(test["label"]) == [0, 0, 2, 10, 999]
    assert list(test["label_name"]) == ["name0", "name0", "name2", "name10", "name999"]
    assert list(test["image"])[:2] == [f"images/{FOLDER}/0/0a3c.jpeg", f"images/{FOLDER}/0/7e1f.jpeg"]
    assert list(test["image"])[3] == f"images/{FOLDER}/10/0a3c.jpeg"
    files = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file())
    assert files == sorted(test["image"])
    assert len(pd.read_parquet(out / "train.parquet")) == 0 and len(pd.read_parquet(out / "val.parquet")) == 0
    n = len(server.requests)
    _prepare(server, out, raw, classes=str(classes))
    assert len(server.requests) == n


def test_imagenetv2_max_samples_extracts_only_the_subset(server, classes, tmp_path):
    assert DATASETS["imagenetv2"].downloads
    ids = []
    for name in ("a", "b"):
        _prepare(server, tmp_path / name, tmp_path / "raw", classes=str(classes), max_samples=2)
        table = pd.read_parquet(tmp_path / name / "test.parquet")
        ids.append(list(table["sample_id"]))
        files = sorted(p.relative_to(tmp_path / name).as_posix() for p in (tmp_path / name).rglob("*.jpeg"))
        assert files == sorted(table["image"])
    assert len(ids[0]) == 2 and ids[0] == ids[1]


def test_imagenetv2_errors_name_the_problem(server, classes, tmp_path):
    with pytest.raises(ValueError, match="needs the setting 'classes'"):
        _prepare(server, tmp_path / "a", tmp_path / "raw")
    with pytest.raises(FileNotFoundError, match="classes file .*nowhere.txt"):
        _prepare(server, tmp_path / "a", tmp_path / "raw", classes=str(tmp_path / "nowhere.txt"))
    partial = tmp_path / "partial.txt"
    partial.write_text("".join(MAPPING.splitlines(keepends=True)[:999]))
    with pytest.raises(ValueError, match="lists 999 classes"):
        _prepare(server, tmp_path / "a", tmp_path / "raw", classes=str(partial))
    assert server.requests == []  # The class names are checked before anything is downloaded.
    server.files["imagenetv2-matched-frequency.tar.gz"] = _archive({"1000": ["abcd.jpeg"]})
    with pytest.raises(ValueError, match=f"member '{FOLDER}/1000/abcd.jpeg' is in folder '1000'"):
        _prepare(server, tmp_path / "b", tmp_path / "raw-b", classes=str(classes))
    server.files["imagenetv2-matched-frequency.tar.gz"] = _tar({"imagenetv2-top-images-format-val/0/a.jpeg": b"x"})
    with pytest.raises(FileNotFoundError, match=f"no images under {FOLDER}/<class index>/"):
        _prepare(server, tmp_path / "c", tmp_path / "raw-c", classes=str(classes))
