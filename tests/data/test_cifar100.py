"""CIFAR-100 test from a binary archive in the published layout, served by a loopback HTTP server."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vlmopt.data import DATASETS, cifar100
from vlmopt.data.download import ChecksumError
from vlmopt.data.sources import RemoteFile
from vlmopt.pipeline import prepare_dataset

# fine_label_names.txt as published: underscores inside names, a blank line at the end.
NAMES = "apple\naquarium_fish\nmaple_tree\npickup_truck\n\n"
# (coarse, fine) of each record of test.bin.
LABELS = [(0, 3), (4, 0), (17, 2), (4, 1), (19, 3)]


def _record(coarse: int, fine: int, k: int) -> bytes:
    """A record whose red plane is the row number, green the column, blue the record number k."""
    rows, cols = np.indices((32, 32), dtype=np.uint8)
    planes = np.stack([rows, cols * 4, np.full((32, 32), 10 * k, dtype=np.uint8)])
    return bytes([coarse, fine]) + planes.tobytes()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _serve(server, monkeypatch, members: dict[str, bytes]) -> str:
    """Serve the archive under its published name, its md5 pinned in place of the real one."""
    archive = _tar_gz(members)
    server.files[cifar100.ARCHIVE] = archive
    pinned = RemoteFile(cifar100.ARCHIVE, cifar100.CIFAR100_FILES[0].url, md5=hashlib.md5(archive).hexdigest())
    monkeypatch.setattr(cifar100, "CIFAR100_FILES", (pinned,))
    return server.url("")


def _published(test_bin: bytes | None = None, names: str | None = NAMES) -> dict[str, bytes]:
    members = {
        "cifar-100-binary/train.bin": _record(1, 1, 9),
        "cifar-100-binary/coarse_label_names.txt": b"aquatic_mammals\n",
        "cifar-100-binary/test.bin": test_bin
        if test_bin is not None
        else b"".join(_record(c, f, k) for k, (c, f) in enumerate(LABELS)),
    }
    if names is not None:
        members["cifar-100-binary/fine_label_names.txt"] = names.encode()
    return members


def test_cifar100_test_converts_the_published_binary_layout(http_server, monkeypatch, tmp_path):
    mirror = _serve(http_server, monkeypatch, _published())
    out = tmp_path / "resources" / "data" / "cifar100"
    prepare_dataset("cifar100", {"source": "cifar100-test", "mirror": mirror, "templates": ["a photo of a {}"]}, out)
    test = pd.read_parquet(out / "test.parquet")
    assert list(test.columns) == ["sample_id", "image", "label", "label_name", "coarse_label"]
    assert list(test["sample_id"]) == ["00000", "00001", "00002", "00003", "00004"]
    assert list(test["image"]) == [f"images/test/0000{i}.png" for i in range(5)]
    assert list(test["label"]) == [3, 0, 2, 1, 3]
    assert list(test["label_name"]) == ["pickup truck", "apple", "maple tree", "aquarium fish", "pickup truck"]
    assert list(test["coarse_label"]) == [0, 4, 17, 4, 19]
    # Planes R, G, B in that order, each row-major: pixel (x, y) of record k is (y, 4x, 10k).
    pixels = np.asarray(Image.open(out / "images" / "test" / "00002.png"))
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert tuple(pixels[5, 7]) == (5, 28, 20) and tuple(pixels[31, 0]) == (31, 0, 20)
    for split in ("train", "val"):
        empty = pd.read_parquet(out / f"{split}.parquet")
        assert len(empty) == 0 and list(empty.columns) == list(test.columns)
    # Only the test records and the fine names were extracted from the archive.
    raw = tmp_path / "resources" / "raw" / "cifar100"
    assert sorted(p.name for p in (raw / "extracted" / "cifar-100-binary").iterdir()) == [
        "fine_label_names.txt",
        "test.bin",
    ]
    # A rerun downloads nothing again.
    n = len(http_server.requests)
    prepare_dataset("cifar100", {"source": "cifar100-test", "mirror": mirror}, out)
    assert len(http_server.requests) == n


def test_max_samples_keeps_a_seeded_subset_and_writes_only_its_images(http_server, monkeypatch, tmp_path):
    mirror = _serve(http_server, monkeypatch, _published())
    spec = DATASETS["cifar100-test"]
    assert spec.downloads and spec.tasks == ("classification",)
    out = tmp_path / "a"
    prepare_dataset("a", {"source": "cifar100-test", "mirror": mirror}, out, raw_dir=tmp_path / "raw")
    full = pd.read_parquet(out / "test.parquet")
    prepare_dataset("a", {"source": "cifar100-test", "mirror": mirror, "max_samples": 2}, out, raw_dir=tmp_path / "raw")
    again = tmp_path / "b"
    prepare_dataset(
        "b", {"source": "cifar100-test", "mirror": mirror, "max_samples": 2}, again, raw_dir=tmp_path / "raw"
    )
    a, b = pd.read_parquet(out / "test.parquet"), pd.read_parquet(again / "test.parquet")
    assert len(a) == 2 and a.equals(b)
    # The subset's rows are rows of the full table, in their original order.
    assert a.equals(full[full["sample_id"].isin(a["sample_id"])].reset_index(drop=True))
    # The earlier full run's other images are gone; the subset's are the same pixels.
    assert sorted(p.name for p in (out / "images" / "test").iterdir()) == sorted(f"{s}.png" for s in a["sample_id"])
    for rel in a["image"]:
        assert (out / rel).read_bytes() == (again / rel).read_bytes()


def test_broken_archives_name_the_problem(http_server, monkeypatch, tmp_path):
    mirror = _serve(http_server, monkeypatch, _published(names=None))
    with pytest.raises(FileNotFoundError, match="cifar-100-binary/fine_label_names.txt"):
        prepare_dataset("c", {"source": "cifar100-test", "mirror": mirror}, tmp_path / "c", raw_dir=tmp_path / "r1")
    mirror = _serve(http_server, monkeypatch, _published(test_bin=_record(0, 1, 0)[:-5]))
    with pytest.raises(ValueError, match="not a whole number of 3074-byte records"):
        prepare_dataset("c", {"source": "cifar100-test", "mirror": mirror}, tmp_path / "c", raw_dir=tmp_path / "r2")
    mirror = _serve(http_server, monkeypatch, _published(test_bin=_record(0, 4, 0)))
    with pytest.raises(ValueError, match="fine label 4, but .* names 4"):
        prepare_dataset("c", {"source": "cifar100-test", "mirror": mirror}, tmp_path / "c", raw_dir=tmp_path / "r3")


def test_the_published_checksum_is_pinned_and_checked(http_server, tmp_path):
    (pinned,) = cifar100.CIFAR100_FILES
    assert pinned.url == "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
    assert pinned.md5 == "03b5dce01913d631647c71ecec9e9cb8"
    # An archive that is not the published one is refused and removed.
    http_server.files[cifar100.ARCHIVE] = _tar_gz(_published())
    with pytest.raises(ChecksumError, match="03b5dce01913d631647c71ecec9e9cb8"):
        prepare_dataset(
            "d", {"source": "cifar100-test", "mirror": http_server.url("")}, tmp_path / "d", raw_dir=tmp_path / "r"
        )
    assert not (tmp_path / "r" / cifar100.ARCHIVE).exists()
