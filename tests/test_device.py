"""Device choice and placement (vlmopt.device): which device a stage picks, what stays on the CPU,
and that inference hands the model its inputs on the model's own device.

This machine has no GPU: CUDA's presence is simulated where only the choice is tested, and the
``meta`` device stands in for "a device other than the CPU" where tensors must really move.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings

import pytest
import torch
from torch import nn

from vlmopt import device as dev
from vlmopt.infer import predict
from vlmopt.models import load_model


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.delenv(dev.ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch says a GPU is there (nothing may actually be moved to it)."""
    monkeypatch.delenv(dev.ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_auto_is_the_cpu_without_cuda_and_cuda_with_it(no_cuda, monkeypatch):
    assert dev.resolve_device() == torch.device("cpu")
    assert dev.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.resolve_device() == torch.device("cuda")


def test_environment_names_the_device_and_an_argument_overrides_it(fake_cuda, monkeypatch):
    monkeypatch.setenv(dev.ENV, "cpu")
    assert dev.resolve_device() == torch.device("cpu")  # a GPU is there, but the environment says cpu
    assert dev.resolve_device("cuda:0") == torch.device("cuda", 0)


def test_cuda_without_a_gpu_is_an_error_not_a_silent_cpu_run(no_cuda, monkeypatch):
    with pytest.raises(RuntimeError, match="'cuda' was asked for but torch sees no CUDA GPU"):
        dev.resolve_device("cuda")
    monkeypatch.setenv(dev.ENV, "cuda:1")
    with pytest.raises(RuntimeError, match="'cuda:1' was asked for"):
        dev.resolve_device()


def test_a_missing_gpu_index_and_unknown_devices_are_named(fake_cuda):
    with pytest.raises(RuntimeError, match=r"'cuda:3' does not exist: 1 CUDA GPU\(s\) visible"):
        dev.resolve_device("cuda:3")
    with pytest.raises(ValueError, match="'gpu0' is not one of auto, cpu, cuda, cuda:N"):
        dev.resolve_device("gpu0")
    with pytest.raises(ValueError, match="'meta': only auto, cpu, cuda and cuda:N"):
        dev.resolve_device("meta")


def _fbgemm_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def test_cpu_only_models_and_variants_stay_on_the_cpu(fake_cuda, tmp_path, monkeypatch):
    plain = nn.Linear(4, 4)
    assert dev.cpu_only_reason(plain) is None
    assert dev.cpu_only_reason(_fbgemm_model()) == "module '0' is a Linear of torch.ao (CPU kernels only)"
    (tmp_path / "manifest.json").write_text(json.dumps({"runtime_steps": [{"method": "dynamic_int8"}]}))
    assert dev.variant_cpu_reason(tmp_path) == "the variant has runtime steps ['dynamic_int8'], which run on the CPU"
    assert dev.cpu_only_reason(plain, tmp_path) == dev.variant_cpu_reason(tmp_path)

    quantized = _fbgemm_model()
    moved = []
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    # CUDA "is there", but neither model may go to it: no move is even attempted.
    assert dev.place(quantized) == torch.device("cpu")
    assert dev.place(plain, "auto", model_dir=tmp_path) == torch.device("cpu")
    assert moved == []
    # A plain model is moved to the GPU.
    assert dev.place(plain, "auto") == torch.device("cuda")
    assert moved == [(torch.device("cuda"),)]


def test_place_moves_the_model_and_to_model_device_its_inputs():
    model = nn.Linear(4, 2)
    assert dev.model_device(model) == torch.device("cpu")
    assert dev.place(model, "cpu") == torch.device("cpu")
    model.to("meta")
    inputs = {"input_ids": torch.ones(2, 3, dtype=torch.long), "pixel_values": torch.zeros(2, 4), "flag": True}
    moved = dev.to_model_device(inputs, model)
    assert moved["input_ids"].device.type == "meta" and moved["input_ids"].dtype == torch.long
    assert moved["pixel_values"].device.type == "meta" and moved["flag"] is True
    assert inputs["input_ids"].device.type == "cpu"  # the caller's dict is not changed
    assert dev.model_device(nn.ReLU()) == torch.device("cpu")  # no parameters, no buffers


def test_generation_gets_its_inputs_on_the_models_device(shapes_texts, shapes_test, shapes_root):
    """The generation loop moves each encoded batch to the model's device (meta here, standing in for a GPU)."""
    loaded = load_model("tiny:blip", texts=shapes_texts, seed=0)
    seen: list[set[str]] = []

    class Recording(type(loaded.adapter)):
        def generate(self, loaded, encoded, **kwargs):
            seen.append({t.device.type for t in encoded.inputs.values() if isinstance(t, torch.Tensor)})
            return ["a shape"] * len(encoded.inputs["input_ids"])

    loaded = dataclasses.replace(loaded, adapter=Recording())
    loaded.model.to("meta")
    out = predict(loaded, shapes_test.head(6), shapes_root, "captioning", batch_size=4, generate_kwargs={})
    assert list(out["prediction"]) == ["a shape"] * 6
    assert seen and all(types == {"meta"} for types in seen), seen


@pytest.mark.parametrize(
    ("environ", "given"),
    [
        ({"SLURM_JOB_GPUS": "3"}, "SLURM_JOB_GPUS=3"),
        ({"SLURM_STEP_GPUS": "0,1"}, "SLURM_STEP_GPUS=0,1"),
        ({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES=0"),
        ({"CUDA_VISIBLE_DEVICES": "GPU-8f1c"}, "CUDA_VISIBLE_DEVICES=GPU-8f1c"),
        ({"CUDA_VISIBLE_DEVICES": ""}, None),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None),
        ({"SLURM_JOB_GPUS": ""}, None),
        ({}, None),
    ],
)
def test_which_environments_give_a_gpu(environ, given):
    from vlmopt.device import gpus_given

    assert gpus_given(environ) == given


def _clear_gpu_variables(monkeypatch):
    for name in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES", "VLMOPT_DEVICE"):
        monkeypatch.delenv(name, raising=False)


def test_a_job_given_a_gpu_that_torch_cannot_use_stops_at_once_naming_the_build(monkeypatch, tmp_path):
    """The environment SLURM sets for a GPU job, with a torch that sees no CUDA device."""
    from vlmopt.device import resolve_device
    from vlmopt.pipeline import start_job

    _clear_gpu_variables(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setenv("SLURM_JOB_GPUS", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    # start_job sets the thread share of the process: restored afterwards.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    stderr = sys.stderr
    try:
        with pytest.raises(RuntimeError) as caught:
            start_job(tmp_path / "job.log")
    finally:
        sys.stderr.close()
        sys.stderr = stderr
    message = str(caught.value)
    assert "given a GPU (SLURM_JOB_GPUS=2)" in message and f"torch {torch.__version__} (CPU-only build)" in message
    assert "make install TORCH_BUILD=cuda" in message and "environment-gpu.yml" in message
    assert "VLMOPT_DEVICE=cpu" in message
    with pytest.raises(RuntimeError, match="cannot use it, so it would run on the CPU"):
        resolve_device("auto")
    # On purpose on the CPU: no error.
    monkeypatch.setenv("VLMOPT_DEVICE", "cpu")
    assert resolve_device() == torch.device("cpu")
    start_job(tmp_path / "cpu.log")
    sys.stderr.close()
    sys.stderr = stderr
    # No GPU given: auto is the CPU, as before.
    _clear_gpu_variables(monkeypatch)
    assert resolve_device("auto") == torch.device("cpu")


MAKE_STUB = """#!/bin/sh
echo "$@" >> "{log}"
"""


@pytest.mark.parametrize(
    ("build", "nvidia_smi", "cuda"),
    [("cuda", False, True), ("cpu", True, False), ("auto", True, True), ("auto", False, False)],
)
def test_make_install_picks_the_torch_build(build, nvidia_smi, cuda, tmp_path):
    """`make install` run with a stand-in Python that records its pip commands (nothing installed)."""
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    log, stub, bin_dir = tmp_path / "pip.log", tmp_path / "python", tmp_path / "bin"
    stub.write_text(MAKE_STUB.format(log=log))
    stub.chmod(0o755)
    bin_dir.mkdir()
    if nvidia_smi:  # a login node has none; a GPU node's lists a GPU
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200'\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    root = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    venv.mkdir()
    result = subprocess.run(
        ["make", "-C", str(root), "install", f"VENV={venv}", f"PY={stub}", f"TORCH_BUILD={build}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    torch_lines = [line for line in log.read_text().splitlines() if "torch==" in line]
    assert torch_lines
    if cuda:
        assert torch_lines == ["-m pip install --quiet torch==2.13.0"]
    else:
        assert all("--index-url" in line or "--no-index" in line for line in torch_lines)


def test_make_install_refuses_an_unknown_torch_build(tmp_path):
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    stub = tmp_path / "python"
    stub.write_text(MAKE_STUB.format(log=tmp_path / "pip.log"))
    stub.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        ["make", "-C", str(root), "install", f"VENV={tmp_path}", f"PY={stub}", "TORCH_BUILD=rocm"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "TORCH_BUILD must be auto, cpu or cuda, not 'rocm'" in result.stdout
