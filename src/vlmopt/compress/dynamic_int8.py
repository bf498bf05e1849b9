"""Dynamic int8 quantization of Linear modules for CPU inference (real, not simulated).

Selected Linear weights are stored as int8 with one symmetric scale per output channel; at run
time each activation row (token) is quantized to int8 on the fly and the product runs on int8
kernels. This is torchao's ``Int8DynamicActivationInt8WeightConfig`` applied through
``torchao.quantization.quantize_`` with a filter on the selected module names; torchao's global
inductor tuning (``set_inductor_config``) is turned off because nothing here compiles.

The quantized weights are torchao tensor subclasses, which ``save_pretrained``/safetensors do
not store, so this is a *runtime* step: a compressed model folder holds the float weights plus a
manifest, and :func:`vlmopt.compress.apply_runtime_steps` re-applies the step after loading.
Quantizing the same float weights always gives the same int8 weights, so a reloaded model
computes exactly what the original quantized model did.

``backend: fbgemm`` uses PyTorch's own dynamically quantized Linear instead
(``torch.ao.quantization.quantize_dynamic`` with per-channel int8 weights): its x86 kernels
(FBGEMM) are what makes int8 faster than float32 on a CPU. Measured on this project's 2-core
machine for one 1024 -> 4096 -> 1024 MLP over 256 tokens (``benchmarks/mlp_latency.py``):
dense float32 53 ms, fbgemm 28 ms, torchao 1,456 ms (torchao's int8 path is built for GPUs and
``torch.compile``; in eager mode on a CPU it falls back to slow reference code). The fbgemm
modules run on CPU only, and torch marks ``torch.ao.quantization`` as deprecated; the choice is
recorded in the manifest.

Docs: https://docs.pytorch.org/ao/stable/generated/torchao.quantization.Int8DynamicActivationInt8WeightConfig.html;
method: Jacob et al., CVPR 2018, https://arxiv.org/abs/1712.05877.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmopt.compress.select import ModuleRef, SelectionSpec
from vlmopt.compress.step import StepInputs, StepResult

__all__ = ["DynamicInt8Config", "apply_dynamic_int8", "torchao_version"]

# Loggers that print at torchao import time on a CPU-only install: missing CUDA extension
# libraries, and a deprecation notice from torch's pytree registration.
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")
BACKENDS = ("torchao", "fbgemm")


@dataclass(frozen=True, kw_only=True)
class DynamicInt8Config(SelectionSpec):
    """Settings of one ``dynamic_int8`` step: the selection and the kernels (``torchao`` or ``fbgemm``)."""

    method = "dynamic_int8"

    backend: str = "torchao"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in BACKENDS:
            raise ValueError(
                f"dynamic_int8: backend={self.backend!r} is not allowed; choose torchao (GPU, maintained) "
                "or fbgemm (fast int8 kernels on x86 CPUs)"
            )


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _torchao() -> Any:
    with _quiet_import():
        import torchao
        import torchao.quantization
    return torchao


def torchao_version() -> str:
    return str(_torchao().__version__)


@torch.no_grad()
def apply_dynamic_int8(
    model: nn.Module, refs: list[ModuleRef], config: DynamicInt8Config, inputs: StepInputs
) -> StepResult:
    """Quantize the weights of ``refs`` to int8 in place; per module, the new weight type.

    Raises ``RuntimeError`` if a selected module did not end up with an int8 weight.
    """
    if config.backend == "fbgemm":
        return _apply_fbgemm(model, refs), None
    torchao = _torchao()
    names = {ref.name for ref in refs}
    ao_config = torchao.quantization.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    torchao.quantization.quantize_(model, ao_config, filter_fn=lambda module, fqn: fqn in names)
    details: dict[str, dict[str, Any]] = {}
    for ref in refs:
        weight = model.get_submodule(ref.name).weight
        qdata = getattr(weight, "qdata", None)
        if qdata is None or qdata.dtype != torch.int8:
            raise RuntimeError(f"dynamic_int8: {ref.name} still has a {type(weight).__name__} weight after quantize_")
        details[ref.name] = {"bits": 8, "weight_type": type(weight).__name__}
    return details, None


def _apply_fbgemm(model: nn.Module, refs: list[ModuleRef]) -> dict[str, dict[str, Any]]:
    """Swap the selected Linears for PyTorch's dynamically quantized Linear (per-channel int8 weights)."""
    for ref in refs:
        weight = ref.module.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise ValueError(
                f"dynamic_int8: backend fbgemm needs float32 weights on the CPU; {ref.name} holds "
                f"{weight.dtype} on {weight.device.type} (use backend: torchao)"
            )
    with warnings.catch_warnings():
        # torch.ao.quantization warns that it is deprecated on every call.
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        spec = {ref.name: per_channel_dynamic_qconfig for ref in refs}
        quantize_dynamic(model, qconfig_spec=spec, dtype=torch.qint8, inplace=True)
    details: dict[str, dict[str, Any]] = {}
    for ref in refs:
        module = model.get_submodule(ref.name)
        if not isinstance(module, DynamicLinear) or module.weight().dtype != torch.qint8:
            raise RuntimeError(f"dynamic_int8: {ref.name} is a {type(module).__name__} after quantize_dynamic")
        details[ref.name] = {"bits": 8, "weight_type": f"{type(module).__module__}.{type(module).__name__}"}
    return details
