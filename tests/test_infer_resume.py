"""A shard killed mid-way resumes at its first unfinished chunk and writes what an uninterrupted run writes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest

from vlmopt.chunks import ChunkStore, chunk_folder, chunk_folders
from vlmopt.models import load_model
from vlmopt.models.blip import BlipAdapter
from vlmopt.pipeline import predict_shard
from vlmopt.tables import read_predictions

#: Two rows per batch, four per chunk: the 24 test rows make at least six chunks.
SETTINGS = {"batch_size": 2, "max_new_tokens": 4, "num_beams": 1}
CHUNK_ROWS = 4
#: Seconds the killed run sleeps in every generate() call, so that the kill lands mid-shard.
SLOW_S = 1.5


@pytest.fixture(autouse=True)
def fixed_code_digest(monkeypatch):
    """The chunks' fingerprint covers the inference code's digest; edits to unrelated library files
    while the test runs must not change it between the killed run and the rerun."""
    monkeypatch.setattr("vlmopt.code_digest.stage_digest", lambda stage, root=None: "fixed")


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory, shapes_texts):
    folder = tmp_path_factory.mktemp("blip")
    load_model("tiny:blip", texts=shapes_texts, seed=0).save(folder)
    return folder


def _run(blip_dir, shapes_root, out, settings=SETTINGS, task="vqa"):
    predict_shard(
        blip_dir,
        shapes_root / "test.parquet",
        shapes_root,
        out,
        task=task,
        shard="1-of-1",
        settings=settings,
        chunk_rows=CHUNK_ROWS,
    )


@pytest.fixture
def generated_rows(monkeypatch):
    """Rows generated in this process, counted at the adapter's generate()."""
    rows = []
    original = BlipAdapter.generate

    def counting(self, loaded, encoded, **kwargs):
        rows.append(int(encoded.inputs["input_ids"].shape[0]))
        return original(self, loaded, encoded, **kwargs)

    monkeypatch.setattr(BlipAdapter, "generate", counting)
    return rows


def _assert_same_file(a, b):
    (df, meta), (ref, ref_meta) = read_predictions(a), read_predictions(b)
    pd.testing.assert_frame_equal(df, ref)
    assert meta == ref_meta
    assert pq.read_schema(a).metadata == pq.read_schema(b).metadata


def test_a_shard_killed_mid_way_resumes_at_its_first_unfinished_chunk(
    blip_dir, shapes_root, shapes_test, tmp_path, caplog, generated_rows
):
    out = tmp_path / "killed" / "shard-1-of-1.parquet"
    script = textwrap.dedent(
        f"""
        import time

        import vlmopt.code_digest
        from vlmopt.models.blip import BlipAdapter
        from vlmopt.pipeline import predict_shard

        vlmopt.code_digest.stage_digest = lambda stage, root=None: "fixed"
        original = BlipAdapter.generate

        def slow(self, loaded, encoded, **kwargs):
            time.sleep({SLOW_S})
            return original(self, loaded, encoded, **kwargs)

        BlipAdapter.generate = slow
        predict_shard(
            {str(blip_dir)!r},
            {str(shapes_root / "test.parquet")!r},
            {str(shapes_root)!r},
            {str(out)!r},
            task="vqa",
            shard="1-of-1",
            settings={SETTINGS!r},
            chunk_rows={CHUNK_ROWS},
        )
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=log_file, stderr=log_file)
    folder = chunk_folder(out)
    deadline = time.monotonic() + 300
    try:
        while not any(folder.glob("chunk-*.parquet")):
            if process.poll() is not None:
                pytest.fail(f"the run ended before writing a chunk: {log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no chunk was written within 300 s")
            time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not out.exists()
    written = sorted(folder.glob("chunk-*.parquet"))
    done_rows = sum(pq.read_metadata(p).num_rows for p in written)
    assert written and done_rows < len(shapes_test)

    with caplog.at_level(logging.INFO, logger="vlmopt.infer"):
        _run(blip_dir, shapes_root, out)
    assert f"resuming shard at row {done_rows}: {len(written)} chunks done" in caplog.text
    # The finished chunks were not predicted again.
    assert sum(generated_rows) == len(shapes_test) - done_rows
    assert chunk_folders(out) == []

    reference = tmp_path / "whole" / "shard-1-of-1.parquet"
    _run(blip_dir, shapes_root, reference)
    assert sum(generated_rows) == 2 * len(shapes_test) - done_rows
    _assert_same_file(out, reference)
    assert chunk_folders(reference) == []


class _Killed(Exception):
    pass


def _stop_after_first_chunk(patch):
    original = ChunkStore.write

    def write_one_then_die(self, index, columns):
        original(self, index, columns)
        raise _Killed

    patch.setattr(ChunkStore, "write", write_one_then_die)


@pytest.mark.parametrize(
    "family,task,task_settings",
    [("clip", "classification", {"templates": ["a photo of a {}.", "{} image"]}), ("blip-itm", "retrieval", {"k": 3})],
)
def test_similarity_shards_resume_too(
    shapes_texts, shapes_root, tmp_path, caplog, monkeypatch, family, task, task_settings
):
    model_dir = tmp_path / family
    load_model(f"tiny:{family}", texts=shapes_texts, seed=0).save(model_dir)

    def run(out):
        predict_shard(
            model_dir,
            shapes_root / "test.parquet",
            shapes_root,
            out,
            task=task,
            shard="2-of-2",
            settings=SETTINGS,
            task_settings=task_settings,
            chunk_rows=CHUNK_ROWS,
        )

    out = tmp_path / "shard-2-of-2.parquet"
    with monkeypatch.context() as patch:
        _stop_after_first_chunk(patch)
        with pytest.raises(_Killed):
            run(out)
    with caplog.at_level(logging.INFO, logger="vlmopt.infer"):
        run(out)
    assert f"resuming shard at row {CHUNK_ROWS}: 1 chunks done" in caplog.text
    reference = tmp_path / "reference.parquet"
    run(reference)
    _assert_same_file(out, reference)
    assert chunk_folders(out) == chunk_folders(reference) == []


def test_chunks_of_other_settings_are_set_aside(blip_dir, shapes_root, shapes_test, tmp_path, caplog, monkeypatch):
    out = tmp_path / "shard-1-of-1.parquet"
    with monkeypatch.context() as patch:
        _stop_after_first_chunk(patch)
        with pytest.raises(_Killed):
            _run(blip_dir, shapes_root, out, task="captioning")
    assert [p.name for p in chunk_folder(out).glob("chunk-*")] == ["chunk-00000.parquet"]

    changed = {**SETTINGS, "max_new_tokens": 3}
    with caplog.at_level(logging.INFO):
        _run(blip_dir, shapes_root, out, settings=changed, task="captioning")
    assert "inference: not resuming from" in caplog.text and "set its 1 chunk(s) aside" in caplog.text
    assert "generation.max_new_tokens: 4 -> 3" in caplog.text
    assert "resuming shard" not in caplog.text
    assert chunk_folders(out) == []
    reference = tmp_path / "reference.parquet"
    _run(blip_dir, shapes_root, reference, settings=changed, task="captioning")
    _assert_same_file(out, reference)
