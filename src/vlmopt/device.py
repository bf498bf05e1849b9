"""Where a stage runs its model: the GPU its job was given, else the CPU.

Every stage that runs a model (finetuning, compression, inference, labeling) places it with
:func:`place` and moves each batch to it with :func:`to_model_device`. The device comes from the
stage's ``device`` argument or, when that is None, the ``VLMOPT_DEVICE`` environment variable:

- ``auto`` (the default): ``cuda`` when torch sees a GPU, else ``cpu``. A SLURM job that asked for
  ``gpu: 1`` sees only its own GPU (``CUDA_VISIBLE_DEVICES``), as ``cuda:0``. A job that was given
  a GPU (:func:`gpus_given`: ``SLURM_JOB_GPUS`` or ``SLURM_STEP_GPUS`` set, or
  ``CUDA_VISIBLE_DEVICES`` naming a device) whose torch cannot use CUDA (a CPU build, installed on
  a login node without GPUs) is an error naming the torch build and how to install the CUDA one,
  not a silent run on the CPU; ``VLMOPT_DEVICE=cpu`` runs it on the CPU on purpose.
- ``cpu``, ``cuda`` or ``cuda:N``: that device; asking for CUDA where torch sees none is an error
  rather than a silent fall-back to the CPU.

A model with modules that run on the CPU only (dynamic int8 with PyTorch's FBGEMM kernels, or any
variant whose manifest has runtime steps, see :func:`cpu_only_reason`) stays on the CPU, and the
log says why.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "ENV",
    "cpu_only_reason",
    "gpus_given",
    "model_device",
    "place",
    "require_usable_gpu",
    "resolve_device",
    "to_model_device",
    "variant_cpu_reason",
]

log = logging.getLogger(__name__)

#: Environment variable naming the device when a stage is given none.
ENV = "VLMOPT_DEVICE"


#: Environment variables through which a scheduler hands a job its GPUs.
GPU_VARIABLES = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES")


def gpus_given(environ: Any = None) -> str | None:
    """The variable (``NAME=value``) through which this job was given a GPU, or None.

    ``SLURM_JOB_GPUS`` / ``SLURM_STEP_GPUS`` count when non-empty; ``CUDA_VISIBLE_DEVICES`` when
    its first entry names a device (an index or a UUID; empty, ``-1`` or ``NoDevFiles`` hide them all).
    """
    environ = os.environ if environ is None else environ
    for name in GPU_VARIABLES:
        value = (environ.get(name) or "").strip()
        if not value:
            continue
        first = value.split(",")[0].strip()
        if name == "CUDA_VISIBLE_DEVICES" and (not first or first.startswith("-") or first == "NoDevFiles"):
            continue
        return f"{name}={value}"
    return None


def _cuda_missing_message(given: str) -> str:
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    return (
        f"this job was given a GPU ({given}) but torch {torch.__version__} ({build}) cannot use it, so it "
        "would run on the CPU. Install the CUDA build of torch in the job's environment: "
        "`make install TORCH_BUILD=cuda` (rebuild .venv first: rm -rf .venv), or "
        "`conda env create -f environment-gpu.yml`, or `pip install --force-reinstall torch==<version>` "
        "from PyPI. With a CUDA build this means the node's driver does not work with it (check nvidia-smi). "
        f"To run on the CPU on purpose, set {ENV}=cpu."
    )


def require_usable_gpu() -> None:
    """Stop a job that was given a GPU its torch cannot use (see the module docstring), unless
    ``VLMOPT_DEVICE`` is ``cpu``; run at the start of every pipeline job."""
    if (os.environ.get(ENV) or "").strip().lower() == "cpu":
        return
    given = gpus_given()
    if given is not None and not torch.cuda.is_available():
        raise RuntimeError(_cuda_missing_message(given))


def resolve_device(setting: str | torch.device | None = None) -> torch.device:
    """The device that ``setting`` (else ``$VLMOPT_DEVICE``, else ``auto``) names on this machine."""
    if isinstance(setting, torch.device):
        return setting
    text = (setting if setting is not None else os.environ.get(ENV) or "auto").strip().lower()
    if text == "auto":
        require_usable_gpu()
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise ValueError(
            f"device {text!r} is not one of auto, cpu, cuda, cuda:N ({ENV} or the device setting)"
        ) from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {text!r}: only auto, cpu, cuda and cuda:N are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {text!r} was asked for but torch sees no CUDA GPU (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'none'}); use auto or cpu, or run on a GPU node"
            )
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise RuntimeError(f"device {text!r} does not exist: {n} CUDA GPU(s) visible")
    return device


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def cpu_only_reason(model: nn.Module, model_dir: str | Path | None = None) -> str | None:
    """Why ``model`` must run on the CPU, or None.

    PyTorch's dynamically quantized Linear (FBGEMM kernels) exists on the CPU only, and a variant
    folder whose manifest lists runtime steps (dynamic int8) is evaluated as the CPU int8 path the
    step was chosen to measure.
    """
    reason = variant_cpu_reason(model_dir) if model_dir is not None else None
    if reason:
        return reason
    for name, module in model.named_modules():
        if type(module).__module__.startswith("torch.ao.nn.quantized"):
            return f"module {name!r} is a {type(module).__name__} of torch.ao (CPU kernels only)"
    return None


def variant_cpu_reason(model_dir: str | Path) -> str | None:
    """Why the variant in ``model_dir`` runs on the CPU (its manifest lists runtime steps), or None."""
    manifest = Path(model_dir) / "manifest.json"
    if not manifest.is_file():
        return None
    steps = json.loads(manifest.read_text()).get("runtime_steps") or []
    if not steps:
        return None
    methods = sorted({s.get("method", "?") for s in steps})
    return f"the variant has runtime steps {methods}, which run on the CPU"


def place(
    model: nn.Module, device: str | torch.device | None = None, *, model_dir: str | Path | None = None
) -> torch.device:
    """Move ``model`` to the resolved device (the CPU where :func:`cpu_only_reason` says so); return it."""
    target = resolve_device(device)
    if target.type != "cpu":
        reason = cpu_only_reason(model, model_dir)
        if reason:
            log.info("running on the CPU, not %s: %s", target, reason)
            target = torch.device("cpu")
    if model_device(model) != target:
        model.to(target)
    log.info("model on %s", target)
    return target


def to_model_device(inputs: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``inputs`` with every tensor on the model's device (dtypes unchanged); other values as they are."""
    device = model_device(model)
    return {k: v.to(device) if isinstance(v, torch.Tensor) and v.device != device else v for k, v in inputs.items()}
