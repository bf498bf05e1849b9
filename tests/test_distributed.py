"""One inference job over several processes (torchrun, gloo on the CPU) predicts what one process does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from vlmopt.distributed import launch_predict_shard, launched, part_path
from vlmopt.models import load_model
from vlmopt.pipeline import predict_shard
from vlmopt.tables import read_predictions

SETTINGS = {"batch_size": 4, "max_new_tokens": 5, "num_beams": 1}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
#: A failing rank must end the job well within this (it takes seconds once the processes have started).
TIMEOUT_S = 240


@pytest.fixture(autouse=True)
def one_thread_each(monkeypatch):
    """One thread per process (two cores, two ranks); the reference runs in this process, not under torchrun."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, shapes_texts):
    folders = {}
    for family in ("blip", "clip"):
        folders[family] = tmp_path_factory.mktemp(family)
        load_model(f"tiny:{family}", texts=shapes_texts, seed=0).save(folders[family])
    return folders


def _one_process(model_dir, shapes_root, out, *, task, shard, task_settings=None):
    predict_shard(
        model_dir,
        shapes_root / "test.parquet",
        shapes_root,
        out,
        task=task,
        shard=shard,
        settings=SETTINGS,
        task_settings=task_settings,
    )
    return read_predictions(out)


def _assert_same(merged, reference):
    (df, meta), (ref, ref_meta) = merged, reference
    assert meta == ref_meta
    assert list(df.columns) == list(ref.columns)
    text_columns = [c for c in df.columns if c not in ("scores", "scores_t2i")]
    assert df[text_columns].equals(ref[text_columns])
    for column in set(df.columns) - set(text_columns):
        np.testing.assert_allclose(np.stack(df[column]), np.stack(ref[column]), rtol=0, atol=1e-6)


def _no_parts(folder):
    return not any(".part-" in p.name for p in folder.iterdir())


def _no_chunks(folder):
    """No folder of the ranks' finished chunks is left once the output is written."""
    return not any(".chunks" in p.name for p in folder.iterdir())


def test_part_files_and_launch_detection(tmp_path, monkeypatch):
    assert part_path(tmp_path / "shard-1-of-2.parquet", 1, 4).name == ".shard-1-of-2.parquet.part-2-of-4.parquet"
    assert not launched()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched()
    with pytest.raises(ValueError, match="at least 2 processes"):
        launch_predict_shard("m", "t", "r", "o", task="vqa", shard="1-of-1", settings={}, processes=1)


def test_two_processes_predict_a_shard_as_one_does(model_dirs, shapes_root, tmp_path, monkeypatch):
    """VQA, launched as the workflow does: every rank's output lands in the job's log."""
    out, log = tmp_path / "two" / "shard-2-of-3.parquet", tmp_path / "job.log"
    with open(log, "w") as stream, monkeypatch.context() as patch:
        patch.setattr(sys, "stderr", stream)
        launch_predict_shard(
            model_dirs["blip"],
            shapes_root / "test.parquet",
            shapes_root,
            out,
            task="vqa",
            shard="2-of-3",
            settings=SETTINGS,
            task_settings={},
            processes=2,
            threads=2,
        )
    text = log.read_text()
    # Rows 8-15 of the split, four per rank.
    assert "rank 0 of 2 (cpu, gloo): shard 2-of-3 rows 8-15" in text and "this rank rows 8-11 (4 rows)" in text
    assert "rank 1 of 2 (cpu, gloo): shard 2-of-3 rows 8-15" in text and "this rank rows 12-15 (4 rows)" in text
    reference = _one_process(model_dirs["blip"], shapes_root, tmp_path / "one.parquet", task="vqa", shard="2-of-3")
    _assert_same(read_predictions(out), reference)
    assert _no_parts(out.parent) and _no_chunks(out.parent)


def test_two_processes_classify_as_one_does(model_dirs, shapes_root, tmp_path):
    """Zero-shot classification, by the command line under torchrun; uneven ranks (3 and 2 rows)."""
    task_settings = {"templates": ["a photo of a {}.", "a {} shape."]}
    out = tmp_path / "two" / "shard-2-of-5.parquet"
    command = [
        *TORCHRUN,
        "-m",
        "vlmopt.cli",
        "infer",
        str(model_dirs["clip"]),
        "--table",
        str(shapes_root / "test.parquet"),
        "--task",
        "classification",
        "--shard",
        "2-of-5",
        "--out",
        str(out),
        "--settings",
        '{"batch_size": 4, "max_new_tokens": 5, "num_beams": 1}',
        "--task-settings",
        '{"templates": ["a photo of a {}.", "a {} shape."]}',
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "this rank rows 5-7 (3 rows)" in result.stderr and "this rank rows 8-9 (2 rows)" in result.stderr
    reference = _one_process(
        model_dirs["clip"],
        shapes_root,
        tmp_path / "one.parquet",
        task="classification",
        shard="2-of-5",
        task_settings=task_settings,
    )
    _assert_same(read_predictions(out), reference)
    assert _no_parts(out.parent) and _no_chunks(out.parent)


def test_a_failing_rank_fails_the_job(model_dirs, shapes_root, tmp_path):
    """Rank 1 raises while rank 0 waits at the barrier: the job ends, non-zero, with rank 1's error."""
    wrapper = tmp_path / "failing_rank.py"
    wrapper.write_text(
        "import os\n"
        "import sys\n\n"
        "from vlmopt import cli, infer\n\n"
        "if os.environ['RANK'] == '1':\n\n"
        "    def fail(*args, **kwargs):\n"
        "        raise RuntimeError('injected failure on rank 1')\n\n"
        "    infer.predict = fail\n"
        "sys.exit(cli.main())\n"
    )
    out = tmp_path / "two" / "shard-1-of-1.parquet"
    command = [
        *TORCHRUN,
        str(wrapper),
        "infer",
        str(model_dirs["blip"]),
        "--table",
        str(shapes_root / "test.parquet"),
        "--task",
        "captioning",
        "--out",
        str(out),
        "--settings",
        '{"batch_size": 4, "max_new_tokens": 5, "num_beams": 1}',
    ]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode != 0
    assert time.monotonic() - start < TIMEOUT_S
    assert "RuntimeError: injected failure on rank 1" in result.stdout + result.stderr
    assert not out.exists()
    assert not out.parent.exists() or _no_parts(out.parent)


def test_ranks_resume_their_finished_chunks(model_dirs, shapes_root, tmp_path):
    """Rank 1 fails after its first chunk; the rerun resumes it there and writes what one process does."""
    wrapper = tmp_path / "resuming_ranks.py"
    wrapper.write_text(
        "import os\n"
        "import sys\n\n"
        "import vlmopt.code_digest\n"
        "from vlmopt import cli, infer\n"
        "from vlmopt.chunks import ChunkStore\n\n"
        "# Edits to unrelated library files between the two runs must not change the chunks' fingerprint.\n"
        "vlmopt.code_digest.stage_digest = lambda stage, root=None: 'fixed'\n"
        "infer.CHUNK_ROWS = 2\n"
        "if os.environ['RANK'] == '1' and os.environ.get('FAIL_AFTER_A_CHUNK'):\n"
        "    original = ChunkStore.write\n\n"
        "    def write_then_fail(self, index, columns):\n"
        "        original(self, index, columns)\n"
        "        raise RuntimeError('injected failure after a chunk on rank 1')\n\n"
        "    ChunkStore.write = write_then_fail\n"
        "sys.exit(cli.main())\n"
    )
    out = tmp_path / "two" / "shard-1-of-1.parquet"
    settings = {"batch_size": 2, "max_new_tokens": 5, "num_beams": 1}
    command = [
        *TORCHRUN,
        str(wrapper),
        "infer",
        str(model_dirs["blip"]),
        "--table",
        str(shapes_root / "test.parquet"),
        "--task",
        "captioning",
        "--out",
        str(out),
        "--settings",
        json.dumps(settings),
    ]
    env = {**os.environ, "FAIL_AFTER_A_CHUNK": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert result.returncode != 0 and "injected failure after a chunk on rank 1" in result.stdout + result.stderr
    assert not out.exists()
    kept = out.parent / f".{out.name}.chunks-2-of-2"
    assert [p.name for p in kept.glob("chunk-*")] == ["chunk-00000.parquet"]

    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming shard at row 2: 1 chunks done" in result.stderr
    reference = _one_process(
        model_dirs["blip"], shapes_root, tmp_path / "one.parquet", task="captioning", shard="1-of-1"
    )
    (df, meta), (ref, ref_meta) = read_predictions(out), reference
    assert meta == ref_meta
    assert df["prediction"].tolist() == ref["prediction"].tolist()
    assert _no_parts(out.parent) and _no_chunks(out.parent)
