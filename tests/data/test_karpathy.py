"""Karpathy splits (coco2014-karpathy, flickr30k-1k) from files in the published layout, served over loopback."""

from __future__ import annotations

import io
import json
import zipfile

import pandas as pd
import pytest
from PIL import Image

from vlmopt.data import DATASETS
from vlmopt.pipeline import prepare_dataset


def _jpeg(color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


def _sentences(*raws: str) -> list[dict]:
    return [{"tokens": raw.lower().split(), "raw": raw, "imgid": 0, "sentid": i} for i, raw in enumerate(raws)]


def _coco(imgid: int, split: str, folder: str, cocoid: int, *raws: str) -> dict:
    return {
        "filepath": folder,
        "filename": f"COCO_{folder}_{cocoid:012d}.jpg",
        "imgid": imgid,
        "split": split,
        "sentences": _sentences(*raws),
        "sentids": list(range(len(raws))),
        "cocoid": cocoid,
    }


# Listed out of imgid order: rows follow imgid. 42 has only a blank caption and is left out.
COCO = [
    _coco(5, "test", "val2014", 73, "A motorcycle parked  on a street."),
    _coco(
        0, "test", "val2014", 391895, "A man with a red helmet on a small moped on a dirt road. ", "Man riding\na bike"
    ),
    _coco(1, "val", "val2014", 522418, "A woman cutting a cake."),
    _coco(2, "restval", "val2014", 184613, "A child holding an umbrella."),
    _coco(3, "train", "train2014", 318556, "A bathroom with a sink."),
    _coco(4, "test", "val2014", 42, "   "),
    _coco(6, "test", "val2014", 74, "A dog on a bed."),
    _coco(7, "train", "train2014", 9, "A plate of food."),
]
FLICKR = [
    {"filename": "1007129816.jpg", "imgid": 1, "split": "test", "sentences": _sentences("A man in a hat.", "A man.")},
    {"filename": "1000092795.jpg", "imgid": 0, "split": "test", "sentences": _sentences("Two young guys.")},
    {"filename": "1000268201.jpg", "imgid": 2, "split": "train", "sentences": _sentences("A child.")},
    {"filename": "1000344755.jpg", "imgid": 3, "split": "val", "sentences": _sentences("Someone on a ladder.")},
    {"filename": "1000366164.jpg", "imgid": 4, "split": "test", "sentences": _sentences("A dog  runs.")},
]


def _caption_zip(coco=COCO, flickr=FLICKR, prefix="") -> bytes:
    return _zip(
        {
            f"{prefix}dataset_coco.json": json.dumps({"images": coco, "dataset": "coco"}).encode(),
            f"{prefix}dataset_flickr30k.json": json.dumps({"images": flickr, "dataset": "flickr30k"}).encode(),
            f"{prefix}dataset_flickr8k.json": b'{"images": [], "dataset": "flickr8k"}',
        }
    )


@pytest.fixture
def server(http_server):
    http_server.files["caption_datasets.zip"] = _caption_zip()
    for folder in ("val2014", "train2014"):
        members = {f"{folder}/{r['filename']}": _jpeg() for r in COCO if r["filepath"] == folder}
        http_server.files[f"{folder}.zip"] = _zip(members)
    return http_server


def _coco_prepare(server, out, raw, **settings):
    prepare_dataset("coco", {"source": "coco2014-karpathy", "mirror": server.url(""), **settings}, out, raw_dir=raw)


def _names(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_coco2014_karpathy_writes_the_test_split_from_val2014_only(server, tmp_path):
    out, raw = tmp_path / "coco", tmp_path / "raw"
    _coco_prepare(server, out, raw)
    test = pd.read_parquet(out / "test.parquet")
    assert list(test.columns) == ["sample_id", "image", "references", "captions"]
    assert list(test["sample_id"]) == ["391895", "73", "74"]
    assert list(test["image"]) == [
        "images/val2014/COCO_val2014_000000391895.jpg",
        "images/val2014/COCO_val2014_000000000073.jpg",
        "images/val2014/COCO_val2014_000000000074.jpg",
    ]
    assert list(test["references"][0]) == [
        "A man with a red helmet on a small moped on a dirt road.",
        "Man riding a bike",
    ]
    assert list(test["references"][1]) == ["A motorcycle parked on a street."]
    assert [list(c) for c in test["captions"]] == [list(r) for r in test["references"]]
    assert len(pd.read_parquet(out / "val.parquet")) == 0 and len(pd.read_parquet(out / "train.parquet")) == 0
    # Only the test images were extracted, and the 13 GB train archive was never asked for.
    assert _names(out / "images") == sorted(r.removeprefix("images/") for r in test["image"])
    assert sorted(p for p, _ in server.requests) == ["caption_datasets.zip", "val2014.zip"]
    assert not (raw / "extracted" / "dataset_flickr8k.json").exists()
    n = len(server.requests)
    _coco_prepare(server, out, raw)
    assert len(server.requests) == n


def test_coco2014_karpathy_train_is_train_plus_restval_from_both_archives(server, tmp_path):
    out = tmp_path / "coco"
    _coco_prepare(server, out, tmp_path / "raw", splits=["train", "val", "test"])
    train = pd.read_parquet(out / "train.parquet")
    assert list(train["sample_id"]) == ["184613", "318556", "9"]
    assert list(train["image"]) == [
        "images/val2014/COCO_val2014_000000184613.jpg",
        "images/train2014/COCO_train2014_000000318556.jpg",
        "images/train2014/COCO_train2014_000000000009.jpg",
    ]
    assert list(pd.read_parquet(out / "val.parquet")["sample_id"]) == ["522418"]
    assert len(pd.read_parquet(out / "test.parquet")) == 3
    assert all((out / rel).is_file() for rel in train["image"])
    assert "train2014.zip" in {p for p, _ in server.requests}


def test_coco2014_karpathy_max_samples_is_a_seeded_subset_per_split(server, tmp_path):
    assert DATASETS["coco2014-karpathy"].downloads
    tables = []
    for name in ("a", "b"):
        _coco_prepare(server, tmp_path / name, tmp_path / "raw", splits=["test", "train"], max_samples=2)
        tables.append({s: pd.read_parquet(tmp_path / name / f"{s}.parquet") for s in ("train", "test")})
    (a, b) = tables
    assert len(a["test"]) == 2 and len(a["train"]) == 2
    assert list(a["test"]["sample_id"]) == list(b["test"]["sample_id"])
    assert list(a["train"]["sample_id"]) == list(b["train"]["sample_id"])
    assert set(a["test"]["sample_id"]) <= {"391895", "73", "74"}
    images = pd.concat([a["test"]["image"], a["train"]["image"]])
    assert _names(tmp_path / "a" / "images") == sorted(r.removeprefix("images/") for r in images)


def test_coco2014_karpathy_reads_the_json_under_one_folder(server, tmp_path):
    server.files["caption_datasets.zip"] = _caption_zip(prefix="caption_datasets/")
    _coco_prepare(server, tmp_path / "coco", tmp_path / "raw")
    assert len(pd.read_parquet(tmp_path / "coco" / "test.parquet")) == 3


def test_coco2014_karpathy_errors_name_the_problem(server, tmp_path):
    with pytest.raises(ValueError, match="setting 'splits' must name some of"):
        _coco_prepare(server, tmp_path / "s", tmp_path / "raw-s", splits=["testing"])
    server.files["caption_datasets.zip"] = _zip({"dataset_flickr30k.json": b"{}"})
    with pytest.raises(FileNotFoundError, match="has no member 'dataset_coco.json'"):
        _coco_prepare(server, tmp_path / "m", tmp_path / "raw-m")
    server.files["caption_datasets.zip"] = _caption_zip(coco=[*COCO, _coco(8, "test", "val2014", 75, "A cat.")])
    with pytest.raises(FileNotFoundError, match=r"val2014.zip lacks 1 image.*COCO_val2014_000000000075.jpg"):
        _coco_prepare(server, tmp_path / "i", tmp_path / "raw-i")
    server.files["caption_datasets.zip"] = _caption_zip(coco=[_coco(0, "dev", "val2014", 1, "A cat.")])
    with pytest.raises(ValueError, match="has the split 'dev'"):
        _coco_prepare(server, tmp_path / "d", tmp_path / "raw-d")
    broken = {k: v for k, v in COCO[0].items() if k != "sentences"}
    server.files["caption_datasets.zip"] = _caption_zip(coco=[broken])
    with pytest.raises(ValueError, match="dataset_coco.json: an image record lacks the field 'sentences'"):
        _coco_prepare(server, tmp_path / "f", tmp_path / "raw-f")


def _flickr_images(folder, names=("1000092795.jpg", "1007129816.jpg", "1000366164.jpg", "1000268201.jpg")):
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes(_jpeg())
    (folder / "results.csv").write_text("image_name| comment_number| comment\n")
    return folder


def _flickr_prepare(server, out, raw, **settings):
    prepare_dataset("flickr", {"source": "flickr30k-1k", "mirror": server.url(""), **settings}, out, raw_dir=raw)


@pytest.mark.parametrize("nested", [True, False])
def test_flickr30k_1k_converts_the_test_split_with_local_images(server, tmp_path, nested):
    local = tmp_path / "local"
    _flickr_images(local / "flickr30k-images" if nested else local)
    out, raw = tmp_path / "flickr", tmp_path / "raw"
    _flickr_prepare(server, out, raw, path=str(local))
    test = pd.read_parquet(out / "test.parquet")
    assert list(test["sample_id"]) == ["1000092795", "1007129816", "1000366164"]
    assert list(test["image"]) == [
        "images/flickr30k-images/1000092795.jpg",
        "images/flickr30k-images/1007129816.jpg",
        "images/flickr30k-images/1000366164.jpg",
    ]
    assert [list(r) for r in test["references"]] == [
        ["Two young guys."],
        ["A man in a hat.", "A man."],
        ["A dog runs."],
    ]
    assert [list(c) for c in test["captions"]] == [list(r) for r in test["references"]]
    assert len(pd.read_parquet(out / "train.parquet")) == 0 and len(pd.read_parquet(out / "val.parquet")) == 0
    assert _names(out / "images") == sorted(r.removeprefix("images/") for r in test["image"])
    n = len(server.requests)
    _flickr_prepare(server, out, raw, path=str(local), max_samples=2)
    assert len(server.requests) == n
    subset = pd.read_parquet(out / "test.parquet")
    assert len(subset) == 2 and _names(out / "images") == sorted(r.removeprefix("images/") for r in subset["image"])


def test_flickr30k_1k_errors_name_the_problem(server, tmp_path):
    with pytest.raises(ValueError, match="needs the setting 'path'"):
        _flickr_prepare(server, tmp_path / "a", tmp_path / "raw")
    assert server.requests == []  # Nothing is downloaded before the local folder is checked.
    local = _flickr_images(tmp_path / "local", names=("1000092795.jpg",))
    with pytest.raises(FileNotFoundError, match=r"2 test image\(s\) are not in .*1007129816.jpg"):
        _flickr_prepare(server, tmp_path / "b", tmp_path / "raw", path=str(local))
