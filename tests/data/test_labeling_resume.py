"""A labeling job killed mid-way resumes at its first unfinished chunk, with an uninterrupted run's outputs."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import vlmopt.infer
from vlmopt.chunks import ChunkStore
from vlmopt.data import SPLITS
from vlmopt.data.labeling import CSV_NAMES
from vlmopt.models import load_model
from vlmopt.pipeline import label_dataset
from vlmopt.tasks import task_vocabulary

CHUNK = 8  # images per chunk: the shapes splits (64 / 8 / 24 images) have 8 + 1 + 3 chunks
SETTINGS = {"source": "labeled", "dataset": "shapes", "captioner": {"model": "blip", "batch_size": 4}}

# Labels the dataset as label_dataset does in a workflow job, each predict call slowed down so
# that the test can kill the process between chunks.
SCRIPT = """
import json, sys, time
import torch
torch.set_num_threads(1)
import vlmopt.infer
real = vlmopt.infer.predict
def slow(*args, **kwargs):
    time.sleep(0.5)
    return real(*args, **kwargs)
vlmopt.infer.predict = slow
from vlmopt.pipeline import label_dataset
a = json.loads(sys.argv[1])
label_dataset("shapes-labeled", a["settings"], a["source"], a["out"], captioner_dir=a["model"],
              work_dir=a["work"], chunk_size=a["chunk"])
"""


@pytest.fixture(scope="module")
def captioner_dir(shapes_train, tmp_path_factory):
    from vlmopt.data import dataset_texts

    folder = tmp_path_factory.mktemp("captioner") / "blip"
    texts = dataset_texts(shapes_train) + task_vocabulary(shapes_train.columns)
    load_model("tiny:blip", texts=texts, seed=0).save(folder)
    return folder


@pytest.fixture
def counted(monkeypatch):
    """The rows vlmopt.infer.predict is asked to predict, by task."""
    rows: dict[str, int] = {}
    real = vlmopt.infer.predict

    def predict(loaded, dataset, root, task, **kwargs):
        rows[task] = rows.get(task, 0) + len(dataset)
        return real(loaded, dataset, root, task, **kwargs)

    monkeypatch.setattr(vlmopt.infer, "predict", predict)
    return rows


def _outputs(root: Path) -> dict[str, bytes]:
    names = [f"{split}.parquet" for split in SPLITS] + list(CSV_NAMES.values())
    files = {name: (root / name).read_bytes() for name in names}
    files["images/"] = "\n".join(sorted(p.relative_to(root).as_posix() for p in (root / "images").rglob("*"))).encode()
    return files


def _chunks(work: Path) -> list[Path]:
    return sorted(p for p in work.glob("*-*.parquet") if re.fullmatch(r"\w+-\d{5}\.parquet", p.name))


def test_a_killed_labeling_job_resumes_with_the_uninterrupted_result(
    shapes_root, captioner_dir, counted, tmp_path, caplog
):
    torch.set_num_threads(1)
    # The uninterrupted run.
    label_dataset(
        "shapes-labeled",
        SETTINGS,
        shapes_root,
        tmp_path / "straight",
        captioner_dir=captioner_dir,
        work_dir=tmp_path / "work-straight",
        chunk_size=CHUNK,
    )
    expected = _outputs(tmp_path / "straight")
    # The tiny captioner says something: the texts hold captions and reasons.
    assert (
        b", it is an image of " in expected["exp2_train_data9.csv"] and b" because " in expected["exp2_test_data9.csv"]
    )
    assert not (tmp_path / "work-straight").exists()
    total = sum(len(pd.read_parquet(shapes_root / f"{split}.parquet")) for split in SPLITS)
    assert counted == {"captioning": total, "vqa": total}
    counted.clear()

    # The same run in another process, killed once its first chunk is written.
    out, work = tmp_path / "resumed", tmp_path / "work"
    args = {
        "settings": SETTINGS,
        "source": str(shapes_root),
        "out": str(out),
        "model": str(captioner_dir),
        "work": str(work),
        "chunk": CHUNK,
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(args)], env=env, stderr=err)
    try:
        deadline = time.monotonic() + 600
        while not _chunks(work):
            assert proc.poll() is None, f"labeling ended before its first chunk: {stderr.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no chunk written in 10 minutes"
            time.sleep(0.05)
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = _chunks(work)
    assert done and len(done) < 12, [p.name for p in done]
    assert not (out / "train.parquet").exists()
    done_rows = sum(len(pd.read_parquet(p)) for p in done)

    # The rerun resumes after the chunks written before the kill, and only labels the rest.
    with caplog.at_level(logging.INFO, logger="vlmopt"):
        label_dataset(
            "shapes-labeled",
            SETTINGS,
            shapes_root,
            out,
            captioner_dir=captioner_dir,
            work_dir=work,
            chunk_size=CHUNK,
        )
    assert counted == {"captioning": total - done_rows, "vqa": total - done_rows}
    train_done = [p for p in done if p.name.startswith("train-")]
    assert len(train_done) == len(done)  # killed within train's 8 chunks
    assert f"resuming split train at row {CHUNK * len(train_done)} (chunk {len(train_done) + 1} of 8)" in caplog.text
    assert "not resuming" not in caplog.text
    assert _outputs(out) == expected
    assert not work.exists()


def test_a_work_folder_of_other_settings_is_set_aside(shapes_root, captioner_dir, counted, tmp_path, caplog):
    torch.set_num_threads(1)
    out, work = tmp_path / "labeled", tmp_path / "work"
    real = vlmopt.infer.predict
    calls = []

    def failing(*args, **kwargs):  # a job that stops after its first two chunks
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("stopped")
        return real(*args, **kwargs)

    vlmopt.infer.predict = failing
    try:
        with pytest.raises(RuntimeError, match="stopped"):
            label_dataset("x", SETTINGS, shapes_root, out, captioner_dir=captioner_dir, work_dir=work, chunk_size=CHUNK)
    finally:
        vlmopt.infer.predict = real
    assert [p.name for p in _chunks(work)] == ["train-00000.parquet", "train-00001.parquet"]

    other = {**SETTINGS, "captioner": {**SETTINGS["captioner"], "max_new_tokens": 5}}
    counted.clear()
    with caplog.at_level(logging.INFO, logger="vlmopt"):
        label_dataset("x", other, shapes_root, out, captioner_dir=captioner_dir, work_dir=work, chunk_size=CHUNK)
    assert "labeling: not resuming from" in caplog.text
    assert "captioner.max_new_tokens: 20 -> 5" in caplog.text
    assert "resuming split" not in caplog.text
    total = sum(len(pd.read_parquet(shapes_root / f"{split}.parquet")) for split in SPLITS)
    assert counted["captioning"] == total  # everything labeled again
    assert not work.exists() and not list(tmp_path.glob("work.stale-*"))  # set-aside chunks removed at the end


def test_chunks_of_other_rows_or_unreadable_are_labeled_again(tmp_path, caplog):
    inputs = {"captioner": {"model": "m"}, "chunk_rows": 2}
    work = ChunkStore(tmp_path / "w", inputs, what="labeling")
    work.write(0, {"sample_id": ["a", "b"], "caption": ["x", "y"], "caption_error": [None, "bad"]}, "train")
    again = ChunkStore(tmp_path / "w", inputs, what="labeling")
    assert again.done("train") == [0] and again.done() == []
    assert again.read(0, "train", sample_ids=["a", "b"]) == {
        "sample_id": ["a", "b"],
        "caption": ["x", "y"],
        "caption_error": [None, "bad"],
    }
    assert again.read(1, "train", sample_ids=["c"]) is None
    assert again.read(0, "train", sample_ids=["a", "c"]) is None
    again.path(1, "train").write_bytes(b"not parquet")
    assert again.read(1, "train", sample_ids=["c"]) is None
    assert "holds other rows" in caplog.text and "is unreadable" in caplog.text
    # Other inputs: the folder is set aside, its chunks kept there, and labeling starts over.
    fresh = ChunkStore(tmp_path / "w", {**inputs, "chunk_rows": 4}, what="labeling")
    assert "labeling: not resuming from" in caplog.text and "chunk_rows: 2 -> 4" in caplog.text
    (stale,) = tmp_path.glob("w.stale-*")
    assert (stale / "train-00000.parquet").exists()
    assert fresh.read(0, "train", sample_ids=["a", "b"]) is None
    fresh.remove()
    assert list(tmp_path.iterdir()) == []
