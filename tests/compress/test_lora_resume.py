"""A compress job killed during LoRA training resumes from its work folder and saves what an
uninterrupted job saves."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlmopt.pipeline import compress_model

STEP = {
    "method": "lora",
    "r": 4,
    "alpha": 8,
    "dropout": 0.0,
    "targets": ["q_proj", "k_proj", "query", "key"],
    "dataset": "shapes",
    "training": {"max_steps": 10, "lr": 1.0e-2, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 2},
}

# The job as a separate process, each training step slowed down so that the kill lands mid-training.
SCRIPT = """
import sys, time, torch
clip = torch.nn.utils.clip_grad_norm_
def slow(*args, **kwargs):
    time.sleep(0.4)
    return clip(*args, **kwargs)
torch.nn.utils.clip_grad_norm_ = slow
from vlmopt.pipeline import compress_model
compress_model(sys.argv[1], sys.argv[2], steps=[{step}], data_root=sys.argv[3], work_dir=sys.argv[4], code="c")
"""


def _killed_during_training(blip2_dir, data_root, out: Path, work: Path) -> int:
    """Start the job, SIGKILL it once a training checkpoint exists; the checkpoint's step."""
    state = work / "step-0" / "lora" / "last" / "state.json"
    args = [str(blip2_dir), str(out), str(data_root), str(work)]
    job = subprocess.Popen([sys.executable, "-c", SCRIPT.format(step=repr(STEP)), *args])
    deadline = time.monotonic() + 240
    while not state.is_file():
        assert job.poll() is None, "the job ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL
    return json.loads(state.read_text())["step"]


def test_a_killed_lora_step_resumes_and_saves_what_an_uninterrupted_job_saves(blip2_dir, data_root, tmp_path, caplog):
    out, work = tmp_path / "variant", tmp_path / "work"
    at = _killed_during_training(blip2_dir, data_root, out, work)
    assert 2 <= at < 10 and not out.exists()
    with caplog.at_level(logging.INFO):
        manifest = compress_model(blip2_dir, out, steps=[STEP], data_root=data_root, work_dir=work, code="c")
    assert f"resumed finetuning from {work / 'step-0' / 'lora' / 'last'} at step {at} of 10" in caplog.text
    assert manifest["steps"][0]["structure"]["resumed_from_step"] == at
    assert not work.exists()  # removed once the variant is saved

    clean = tmp_path / "clean"
    expected = compress_model(blip2_dir, clean, steps=[STEP], data_root=data_root)
    assert expected["steps"][0]["structure"]["resumed_from_step"] == 0
    resumed, uninterrupted = load_file(out / "model.safetensors"), load_file(clean / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    changed = [m["elements_changed"] for m in manifest["steps"][0]["modules"]]
    assert changed == [m["elements_changed"] for m in expected["steps"][0]["modules"]] and sum(changed) > 0
