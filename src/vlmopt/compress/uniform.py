"""Uniform round-to-nearest weight quantization, simulated (fake quantization).

Each selected Linear weight is replaced by ``dequantize(quantize(w))`` in the model's own dtype:
the model computes exactly what a kernel with ``bits``-bit weights would compute, but the weights
are still stored as floats, so the saved model is no smaller (the manifest reports the nominal
size, elements x bits). Biases are left alone. This is the "uniform" method of the BLIP-2
quantization grid study, which used per-tensor asymmetric min-max; here per-channel is the
default and per-tensor or grouped scales are settings. ``bits=16`` (which meant "leave this part
alone" in that study) is rejected: a step that changes nothing is an error, drop the step
instead, and so is re-rounding weights that are already on the grid (the same float32 step twice):
an element counts as changed only when it moves by more than
:data:`~vlmopt.compress.quant.CHANGE_TOLERANCE` of its grid step.

``activation_bits`` (2..8, default off) also fake-quantizes each selected module's input, per
token and on the fly (:mod:`vlmopt.compress.activations`), with the step's ``symmetric`` setting;
the manifest records the width per module and the loader re-attaches the quantizers.

Method: Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018, https://arxiv.org/abs/1712.05877; survey of
round-to-nearest baselines in Frantar et al., "GPTQ", ICLR 2023, https://arxiv.org/abs/2210.17323.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmopt.compress.activations import quantize_inputs
from vlmopt.compress.packed import GridRecord, record_grid
from vlmopt.compress.quant import (
    CHANGE_TOLERANCE,
    QuantSpec,
    choose_qparams,
    count_changed,
    fake_quantize,
    grid_step,
)
from vlmopt.compress.select import ModuleRef, SelectionSpec
from vlmopt.compress.step import StepInputs, StepResult

__all__ = ["UniformConfig", "apply_uniform"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class UniformConfig(SelectionSpec):
    """Settings of one ``uniform`` step: bit width, scale granularity, symmetry, and selection."""

    method = "uniform"

    bits: int
    granularity: str = "per_channel"
    group_size: int | None = None
    symmetric: bool = False
    activation_bits: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        a = self.activation_bits
        if a is not None and (isinstance(a, bool) or not isinstance(a, int) or not 2 <= a <= 8):
            raise ValueError(
                f"uniform: activation_bits={a!r} is not allowed; integer quantization uses 2..8 bits "
                "(leave it out to keep activations in floating point)"
            )
        if self.bits == 16 and not isinstance(self.bits, bool):
            raise ValueError(
                "uniform: bits=16 means 'leave unquantized', which would change nothing; "
                "remove the step instead (a variant with no steps is the baseline)"
            )
        try:
            self.quant_spec()
        except ValueError as err:
            raise ValueError(f"uniform: {err}") from None

    def quant_spec(self) -> QuantSpec:
        return QuantSpec(
            bits=self.bits, granularity=self.granularity, group_size=self.group_size, symmetric=self.symmetric
        )


@torch.no_grad()
def apply_uniform(model: nn.Module, refs: list[ModuleRef], config: UniformConfig, inputs: StepInputs) -> StepResult:
    """Fake-quantize the weights of ``refs`` in place; per module, how many elements changed.

    ``model`` is unused (the handlers share one signature). An element counts as changed when it
    moved by more than :data:`~vlmopt.compress.quant.CHANGE_TOLERANCE` of its grid step, so
    re-rounding weights already on the grid (float rounding only) changes nothing. A module whose
    weights were already on the grid keeps ``elements_changed: 0`` (recorded and logged); a step
    in which no element changed at all raises ``ValueError``.
    """
    spec = config.quant_spec()
    details: dict[str, dict[str, Any]] = {}
    for ref in refs:
        weight = ref.module.weight
        new = fake_quantize(weight.detach(), spec)
        changed = count_changed(weight, new, grid_step(weight.detach(), spec))
        if weight.ndim == 2:  # a Linear's grid, for packed storage (vlmopt.compress.packed)
            scale, zero_point = choose_qparams(weight.detach(), spec)
            record_grid(ref.module, _grid_record(spec, scale, zero_point))
        weight.copy_(new)
        details[ref.name] = {"bits": config.bits, "elements_changed": changed}
        if config.activation_bits is not None:
            quantize_inputs(ref.module, config.activation_bits, symmetric=config.symmetric, name=ref.name)
            details[ref.name]["activation_bits"] = config.activation_bits
        if changed == 0:
            log.warning(
                "uniform: %s was already exactly representable at %d bits (no element moved by more than %g "
                "of its grid step)",
                ref.name,
                config.bits,
                CHANGE_TOLERANCE,
            )
    if refs and not any(d["elements_changed"] for d in details.values()):
        raise ValueError(
            f"uniform: {config.to_dict()} selected {len(refs)} modules but changed no weight "
            f"(all already exactly representable: no element moved by more than {CHANGE_TOLERANCE:g} of its grid "
            "step, e.g. the same quantization applied twice)"
        )
    return details, None


def _grid_record(spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor) -> GridRecord:
    """The grid :func:`~vlmopt.compress.quant.choose_qparams` chose, as :mod:`vlmopt.compress.packed` keeps it."""
    strategy = {"per_channel": "channel", "per_tensor": "tensor", "group": "group"}[spec.granularity]
    return GridRecord(
        bits=spec.bits,
        symmetric=spec.symmetric,
        strategy=strategy,
        group_size=spec.group_size,
        scale=scale.squeeze(-1),
        zero_point=zero_point.squeeze(-1),
    )
