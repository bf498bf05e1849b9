"""COCO val2017 captions from archives in the published layout, served by a loopback HTTP server."""

from __future__ import annotations

import io
import json
import zipfile

import pandas as pd
import pytest
from PIL import Image

from vlmopt.data import DATASETS
from vlmopt.pipeline import prepare_dataset

IMAGES = {139: ["A man on a horse.", "Someone  rides a horse"], 285: ["A big bear."], 632: ["A bedroom with a bed."]}


def _jpeg(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def coco_server(http_server):
    annotations, next_id = [], 1000
    # Annotation ids out of order: references follow the ids, not the file order.
    for image_id, texts in IMAGES.items():
        for text in reversed(texts):
            next_id -= 1
            annotations.append({"image_id": image_id, "id": next_id, "caption": text})
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (632, 139, 285, 776)]  # 776 has no caption
    captions = {"images": images, "annotations": annotations}
    http_server.files["annotations_trainval2017.zip"] = _zip(
        {"annotations/captions_val2017.json": json.dumps(captions).encode(), "annotations/other.json": b"{}"}
    )
    http_server.files["val2017.zip"] = _zip({f"val2017/{i['file_name']}": _jpeg("red") for i in images})
    return http_server


def test_coco2017_val_converts_the_published_layout(coco_server, tmp_path):
    out = tmp_path / "resources" / "data" / "coco"
    prepare_dataset("coco", {"source": "coco2017-val", "mirror": coco_server.url("")}, out)
    test = pd.read_parquet(out / "test.parquet")
    assert list(test["sample_id"]) == ["139", "285", "632"]
    # Captions in annotation-id order (the file lists them the other way), whitespace normalised; the image
    # without captions is left out.
    assert list(test["references"][0]) == ["A man on a horse.", "Someone rides a horse"]
    assert [list(c) for c in test["captions"]] == [list(r) for r in test["references"]]
    assert all((out / rel).is_file() for rel in test["image"])
    assert len(pd.read_parquet(out / "train.parquet")) == 0 and len(pd.read_parquet(out / "val.parquet")) == 0
    # Downloads are kept beside the data for reruns; only the captions file was extracted from the annotations.
    raw = tmp_path / "resources" / "raw" / "coco"
    assert (raw / "val2017.zip").is_file() and not (raw / "extracted" / "annotations" / "other.json").exists()
    # A rerun downloads nothing again.
    n = len(coco_server.requests)
    prepare_dataset("coco", {"source": "coco2017-val", "mirror": coco_server.url("")}, out)
    assert len(coco_server.requests) == n


def test_max_samples_keeps_a_seeded_subset_and_extracts_only_its_images(coco_server, tmp_path):
    assert DATASETS["coco2017-val"].downloads
    first = tmp_path / "a"
    prepare_dataset(
        "a",
        {"source": "coco2017-val", "mirror": coco_server.url(""), "max_samples": 2},
        first,
        raw_dir=tmp_path / "raw",
    )
    again = tmp_path / "b"
    prepare_dataset(
        "b",
        {"source": "coco2017-val", "mirror": coco_server.url(""), "max_samples": 2},
        again,
        raw_dir=tmp_path / "raw",
    )
    a, b = pd.read_parquet(first / "test.parquet"), pd.read_parquet(again / "test.parquet")
    assert len(a) == 2 and list(a["sample_id"]) == list(b["sample_id"])
    assert sorted(p.name for p in (first / "images" / "val2017").iterdir()) == sorted(
        rel.rsplit("/", 1)[1] for rel in a["image"]
    )


def test_unknown_setting_and_undeclared_source_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['n_train'\]"):
        prepare_dataset("coco", {"source": "coco2017-val", "n_train": 3}, tmp_path / "x")
    with pytest.raises(ValueError, match="cannot prepare it yet"):
        prepare_dataset("v2", {"source": "no-such-source"}, tmp_path / "y")
