"""Lower-precision floating point: cast the whole model to float16 or bfloat16 (real, not simulated).

A ``precision`` step casts every floating-point parameter and saved buffer of the model to ``dtype``,
so the saved weights, the memory a loaded model holds and (on hardware with half-precision
kernels) its latency really drop; nothing is simulated. The step works on the whole model, not
on a part: a model whose parts run at different float widths would need casts between them,
which no family's forward pass has, so ``part`` must stay ``all`` and ``position``, ``role`` and
``modules`` are refused. Its recorded modules are every Linear in the model's layers (the usual
selection with ``part: all``); the manifest's parameter accounting, taken after the step, counts
every parameter at 16 bits, embeddings and norms included.

Modules that the model class asks to keep in float32 (transformers' ``_keep_in_fp32_modules``
for float16, ``_keep_in_fp32_modules_strict`` for both widths; BLIP-2 keeps its Q-Former and
query tokens in float32 under float16) stay float32, exactly as ``from_pretrained`` with that
dtype would load them: the cast model then computes what its reloaded copy computes, and the
manifest counts those tensors at 32 bits. The step's summary lists them (``kept_float32``).

The dtype is recorded in the manifest and passed to the loader when the compressed folder is read
back (:func:`vlmopt.compress.saved.load_variant`), because not every configuration class restores a
float16 checkpoint as float16 by itself. float16 has 5 exponent bits (range about 6e-5 to 65504,
so large activations can overflow), bfloat16 keeps float32's 8 exponent bits with a 7-bit
mantissa: see Micikevicius et al., "Mixed Precision Training", ICLR 2018,
https://arxiv.org/abs/1710.03740, and Kalamkar et al., "A Study of BFLOAT16 for Deep Learning
Training", 2019, https://arxiv.org/abs/1905.12322.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmopt.compress.select import ModuleRef, SelectionSpec
from vlmopt.compress.step import StepInputs, StepResult

__all__ = ["PRECISION_DTYPES", "PrecisionConfig", "apply_precision", "kept_in_float32", "precision_dtype"]

log = logging.getLogger(__name__)

#: Names a ``precision`` step accepts, and the torch dtypes they mean.
PRECISION_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class PrecisionConfig(SelectionSpec):
    """Settings of one ``precision`` step: the target ``dtype`` (float16 or bfloat16); the whole model."""

    method = "precision"

    part: str | tuple[str, ...] = "all"
    dtype: str

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dtype not in PRECISION_DTYPES:
            raise ValueError(
                f"precision: dtype={self.dtype!r} is not allowed; choose one of {', '.join(PRECISION_DTYPES)}"
            )
        for key, default in (("part", "all"), ("position", "all"), ("role", "both"), ("modules", ())):
            if getattr(self, key) != default:
                raise ValueError(
                    f"precision: {key} does not apply; the step casts the whole model (parts running at different "
                    "float widths would need casts between them)"
                )


def apply_precision(model: nn.Module, refs: list[ModuleRef], config: PrecisionConfig, inputs: StepInputs) -> StepResult:
    """Cast ``model`` to ``config.dtype`` in place; per recorded Linear its width, and a step summary.

    Raises ``ValueError`` if the model already holds only ``dtype`` floats (the step would change
    nothing) or holds weights that are not plain tensors (a runtime step ran before).
    """
    dtype = PRECISION_DTYPES[config.dtype]
    keep = kept_in_float32(model, dtype)
    plan, kept, before = [], set(), set()
    for owner_name, owner in model.named_modules():
        transient = getattr(owner, "_non_persistent_buffers_set", set())
        for attr, tensor in [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]:
            # Buffers that are not saved (rotary inv_freq) are rebuilt in float32 by from_pretrained
            # at any dtype: casting them would make the evaluated model differ from its reload.
            if tensor is None or not tensor.is_floating_point() or attr in transient:
                continue
            name = f"{owner_name}.{attr}" if owner_name else attr
            before.add(str(tensor.dtype).removeprefix("torch."))
            target = dtype
            if keep is not None and keep.search(name):
                target = torch.float32
                kept.add(name.split(".")[0])
            if tensor.dtype != target:
                plan.append((tensor, target))
    if not plan:
        raise ValueError(f"precision: the model is already {config.dtype}; the step would change nothing")
    for tensor, target in plan:
        tensor.data = tensor.data.to(target)
    details = {}
    for ref in refs:
        width = ref.module.weight.dtype
        details[ref.name] = {"bits": width.itemsize * 8, "dtype": str(width).removeprefix("torch.")}
    summary = {
        "dtype": config.dtype,
        "dtypes_before": sorted(before),
        "tensors_cast": len(plan),
        "kept_float32": sorted(kept),
    }
    log.info(
        "precision: cast %d tensors from %s to %s; kept in float32: %s",
        len(plan),
        sorted(before),
        config.dtype,
        sorted(kept) or "none",
    )
    return details, summary


def kept_in_float32(model: nn.Module, dtype: torch.dtype) -> re.Pattern[str] | None:
    """The pattern of tensor names that ``from_pretrained(dtype=dtype)`` keeps in float32, or None.

    Reads transformers' class attributes ``_keep_in_fp32_modules`` (honoured for float16) and
    ``_keep_in_fp32_modules_strict`` (float16 and bfloat16), of the model and its sub-models.
    """
    names: set[str] = set()
    for module in model.modules():
        if dtype == torch.float16:
            names.update(getattr(module, "_keep_in_fp32_modules", None) or ())
        names.update(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    if not names:
        return None
    # Entries are module names or globs; a tensor is kept when its dotted name contains one.
    alternatives = [re.escape(name).replace(r"\*", r"[^.]*") for name in sorted(names)]
    return re.compile(r"(?:^|\.)(?:" + "|".join(alternatives) + r")(?:\.|$)")


def precision_dtype(manifest: Mapping[str, Any]) -> str | None:
    """The dtype a compressed folder's last ``precision`` step cast to, or None if it has none."""
    dtypes = [step["settings"]["dtype"] for step in manifest.get("steps", []) if step.get("method") == "precision"]
    return dtypes[-1] if dtypes else None
