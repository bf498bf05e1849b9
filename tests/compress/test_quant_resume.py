"""GPTQ and AWQ keep their progress in the step's work folder after each layer: a job killed
mid-model resumes after the last finished layer and saves what an uninterrupted job saves."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmopt.compress import apply_variant, awq, gptq
from vlmopt.compress.step import StepWork
from vlmopt.models import load_model
from vlmopt.pipeline import compress_model

CALIBRATION = {"dataset": "shapes", "split": "train", "n": 8, "batch_size": 4}
# Every part: 9 layers (3 vision, 3 bridge, 3 language), with act_order and groups.
GPTQ = {"method": "gptq", "bits": 3, "part": "all", "group_size": 16, "act_order": True, "calibration": CALIBRATION}
# The language model: 3 layers, whose scales fold into the norms and into fc1.
AWQ = {"method": "awq", "bits": 3, "part": "language", "clip": True, "calibration": CALIBRATION}
# The function each method calls once per Linear (GPTQ) or set of Linears sharing an input (AWQ).
QUANTIZER = {"gptq": "vlmopt.compress.gptq.gptq_quantize", "awq": "vlmopt.compress.awq.awq_quantize"}

ORIGINAL = {"gptq": gptq.gptq_quantize, "awq": awq.awq_quantize}

# The job as a separate process, each call of the quantizer slowed down so that the kill lands mid-model.
SCRIPT = """
import sys, time, importlib
module_name, _, attr = {quantizer!r}.rpartition(".")
module = importlib.import_module(module_name)
quantize = getattr(module, attr)
def slow(*args, **kwargs):
    time.sleep(0.3)
    return quantize(*args, **kwargs)
setattr(module, attr, slow)
from vlmopt.pipeline import compress_model
compress_model(sys.argv[1], sys.argv[2], steps=[{step!r}], data_root=sys.argv[3], work_dir=sys.argv[4], code="c")
"""


def _counting(monkeypatch, method: str, fail_after: int | None = None) -> list[int]:
    """Count the quantizer's calls (raising on call ``fail_after + 1``, as a crash mid-model would)."""
    module_name, _, attr = QUANTIZER[method].rpartition(".")
    module = sys.modules[module_name]
    quantize = ORIGINAL[method]
    calls = [0]

    def counted(*args, **kwargs):
        if fail_after is not None and calls[0] >= fail_after:
            raise RuntimeError("killed")
        calls[0] += 1
        return quantize(*args, **kwargs)

    monkeypatch.setattr(module, attr, counted)
    return calls


def _killed_mid_model(blip2_dir, data_root, out: Path, work: Path, step: dict, layers: int) -> int:
    """Start the job, SIGKILL it once its first layer is checkpointed; the layers it had finished."""
    state = work / "step-0" / "layers" / "state.json"
    args = [str(blip2_dir), str(out), str(data_root), str(work)]
    script = SCRIPT.format(quantizer=QUANTIZER[step["method"]], step=step)
    job = subprocess.Popen([sys.executable, "-c", script, *args])
    deadline = time.monotonic() + 240
    while not state.is_file():
        assert job.poll() is None, "the job ended before its first layer was checkpointed"
        assert time.monotonic() < deadline, "no layer checkpointed within 240 s"
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL
    done = json.loads(state.read_text())["step"]
    assert 1 <= done < layers, f"the kill landed after layer {done} of {layers}"
    return done


@pytest.mark.parametrize(("step", "layers"), [(GPTQ, 9), (AWQ, 3)], ids=["gptq", "awq"])
def test_a_killed_job_resumes_after_its_last_layer_and_saves_what_an_uninterrupted_job_saves(
    blip2_dir, data_root, tmp_path, caplog, monkeypatch, step, layers
):
    method = step["method"]
    out, work = tmp_path / "variant", tmp_path / "work"
    done = _killed_mid_model(blip2_dir, data_root, out, work, step, layers)
    assert not out.exists()
    saved = sorted(p.name for p in (work / "step-0" / "layers").glob("layer-*.safetensors"))
    assert saved == [f"layer-{i:04d}.safetensors" for i in range(done)]

    calls = _counting(monkeypatch, method)
    with caplog.at_level(logging.INFO):
        manifest = compress_model(blip2_dir, out, steps=[step], data_root=data_root, work_dir=work, code="c")
    assert f"{method}: resuming after layer {done} of {layers} (" in caplog.text
    assert f"quantized layer {done} of {layers} " not in caplog.text  # the finished layers were skipped
    assert f"quantized layer {done + 1} of {layers} " in caplog.text
    resumed_calls = calls[0]
    assert not work.exists()  # removed once the variant is saved

    calls[0] = 0
    clean = tmp_path / "clean"
    expected = compress_model(blip2_dir, clean, steps=[step], data_root=data_root)
    assert 0 < resumed_calls < calls[0]

    resumed, uninterrupted = load_file(out / "model.safetensors"), load_file(clean / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])] == []
    assert manifest["steps"][0]["modules"] == expected["steps"][0]["modules"]
    # The manifest holds no timing or path fields: the whole of it must match.
    assert manifest == expected
    assert json.loads((out / "manifest.json").read_text()) == json.loads((clean / "manifest.json").read_text())
    assert sum(m["elements_changed"] for m in manifest["steps"][0]["modules"]) > 0
    if method == "awq":  # the folds of the finished layers were restored with their weights
        folded = {m["scale_folded_into"] for m in manifest["steps"][0]["modules"]} - {"weight"}
        assert any(name.endswith("layer_norm") for name in folded) and any(n.endswith("fc1") for n in folded)


# In process: a failure mid-model (an exception in the quantizer) leaves the same work folder.

IN_PROCESS = {
    "gptq": {"method": "gptq", "bits": 3, "part": "language", "group_size": 8},
    "awq": {"method": "awq", "bits": 3, "part": "language"},
}
# Quantizer calls per language layer: q, k, v, out, fc1, fc2 for GPTQ; qkv, out, fc1, fc2 for AWQ.
PER_LAYER = {"gptq": 6, "awq": 4}


def _run(shapes_texts, calibration, steps, work: StepWork | None, *, nudge: bool = False):
    loaded = load_model("tiny:blip2-opt", texts=shapes_texts, seed=0)
    if nudge:  # the model as a nondeterministic earlier step might leave it
        with torch.no_grad():
            loaded.model.language_projection.weight[0, 0] += 1e-3
    manifest = apply_variant(loaded.model, loaded.parts(), steps, calibration=calibration, work=work)
    return manifest, {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_failed_run_resumes_with_identical_weights_and_details(
    method, shapes_texts, blip2_calibration, tmp_path, caplog, monkeypatch
):
    steps = [IN_PROCESS[method]]
    work = StepWork(tmp_path / "work", {"model": "m", "code": "c"})
    per_layer = PER_LAYER[method]
    _counting(monkeypatch, method, fail_after=per_layer + 1)
    with pytest.raises(RuntimeError, match="killed"):
        _run(shapes_texts, blip2_calibration, steps, work)
    state = json.loads((work.folder / "step-0" / "layers" / "state.json").read_text())
    assert state["step"] == 1
    progress = json.loads((work.folder / "step-0" / "layers" / "progress.json").read_text())
    assert progress["layers"] == ["language_model.model.decoder.layers.0"]
    kept = load_file(work.folder / "step-0" / "layers" / "layer-0000.safetensors")
    prefix = "language_model.model.decoder.layers.0."
    linears = {f"{prefix}{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
    linears |= {f"{prefix}{m}.weight" for m in ("self_attn.out_proj", "fc1", "fc2")}
    params = {k for k in kept if not k.startswith("grid/")}
    assert linears <= params and all(k.startswith(prefix) for k in params)
    if method == "gptq":
        assert params == linears  # only what the step changed
        # and the grids the layer's weights lie on, for packed storage
        assert {k.rpartition("/")[0] for k in kept if k.startswith("grid/")} == {
            "grid/" + name.removesuffix(".weight") for name in linears
        }
    else:
        assert params > linears  # and the norms (and fc1's bias) that took scales

    calls = _counting(monkeypatch, method)
    with caplog.at_level(logging.INFO):
        manifest, weights = _run(shapes_texts, blip2_calibration, steps, work)
    assert f"{method}: resuming after layer 1 of 3 (language_model.model.decoder.layers.0)" in caplog.text
    assert calls[0] == 2 * per_layer

    expected, expected_weights = _run(shapes_texts, blip2_calibration, steps, None)
    assert manifest == expected
    assert [k for k in weights if not torch.equal(weights[k], expected_weights[k])] == []

    # Rerun once more: every layer is finished, nothing is quantized again, and the result is the same.
    calls[0] = 0
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again, again_weights = _run(shapes_texts, blip2_calibration, steps, work)
    assert f"{method}: resuming after layer 3 of 3" in caplog.text and calls[0] == 0
    assert again == expected
    assert all(torch.equal(again_weights[k], expected_weights[k]) for k in weights)


def test_progress_of_other_inputs_or_damaged_is_set_aside(
    shapes_texts, blip2_calibration, tmp_path, caplog, monkeypatch
):
    steps = [IN_PROCESS["gptq"]]
    folder = tmp_path / "work"
    _counting(monkeypatch, "gptq", fail_after=PER_LAYER["gptq"] + 1)
    with pytest.raises(RuntimeError, match="killed"):
        _run(shapes_texts, blip2_calibration, steps, StepWork(folder, {"model": "m", "code": "c"}))
    calls = _counting(monkeypatch, "gptq")
    expected, expected_weights = _run(shapes_texts, blip2_calibration, steps, None)

    # Other inputs (another code digest): set aside with the difference named, never resumed.
    calls[0] = 0
    with caplog.at_level(logging.INFO):
        manifest, weights = _run(shapes_texts, blip2_calibration, steps, StepWork(folder, {"model": "m", "code": "d"}))
    assert 'code: "c" -> "d"' in caplog.text and "resuming after" not in caplog.text
    assert calls[0] == 3 * PER_LAYER["gptq"]
    assert manifest == expected and all(torch.equal(weights[k], expected_weights[k]) for k in weights)
    assert [p.name for p in (folder / "step-0").iterdir() if p.name.startswith("layers.stale-")]

    # A damaged checkpoint (a layer's file missing): set aside before anything is loaded.
    _counting(monkeypatch, "gptq", fail_after=PER_LAYER["gptq"] + 1)
    work = StepWork(folder, {"model": "m", "code": "e"})
    with pytest.raises(RuntimeError, match="killed"):
        _run(shapes_texts, blip2_calibration, steps, work)
    (folder / "step-0" / "layers" / "layer-0000.safetensors").unlink()
    calls = _counting(monkeypatch, "gptq")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        manifest, weights = _run(shapes_texts, blip2_calibration, steps, work)
    assert "gptq: not resuming from" in caplog.text and "resuming after" not in caplog.text
    assert calls[0] == 3 * PER_LAYER["gptq"]
    assert manifest == expected and all(torch.equal(weights[k], expected_weights[k]) for k in weights)

    # The same inputs but other weights entering the step (an earlier step that reran differently).
    _counting(monkeypatch, "gptq", fail_after=PER_LAYER["gptq"] + 1)
    work = StepWork(folder, {"model": "m", "code": "f"})
    with pytest.raises(RuntimeError, match="killed"):
        _run(shapes_texts, blip2_calibration, steps, work)
    calls = _counting(monkeypatch, "gptq")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _run(shapes_texts, blip2_calibration, steps, work, nudge=True)
    assert "other inputs (layer_walk.weights:" in caplog.text and "resuming after" not in caplog.text
    assert calls[0] == 3 * PER_LAYER["gptq"]
