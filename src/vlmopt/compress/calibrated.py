"""GPTQ and AWQ on whole models: calibration-driven, layer by layer, in pipeline order.

The tensor math lives in :mod:`vlmopt.compress.gptq` and :mod:`vlmopt.compress.awq`; this module
walks the selected Linear modules layer by layer (vision, then bridge, then language), captures
each layer's inputs on the calibration batches with every earlier layer already quantized
(:func:`~vlmopt.compress.calibrate.capture_layer_inputs`), and replaces the weights by their
quantized effective values (simulated: floats on the quantization grid, or for AWQ the grid
divided by the channel scales, which is what the scaled layer computes).

A step names its calibration data: ``calibration: {dataset: shapes, split: train, n: 128}``
(defaults: the train split, 128 samples, batches of 8, seed 0); the caller turns that into a
:class:`~vlmopt.compress.calibrate.Calibration` (see :func:`vlmopt.pipeline.compress_model`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmopt.compress.calibrate import Calibration, capture_layer_inputs, layer_groups
from vlmopt.compress.select import ModuleRef, Parts, SelectionSpec

__all__ = ["AWQConfig", "CALIBRATION_KEYS", "GPTQConfig", "apply_awq", "apply_gptq", "calibration_settings"]

log = logging.getLogger(__name__)

#: Keys of a step's ``calibration`` mapping and their defaults (``dataset`` is required).
CALIBRATION_KEYS = {"dataset": None, "split": "train", "n": 128, "batch_size": 8, "seed": 0}


def calibration_settings(settings: dict[str, Any] | None, label: str) -> dict[str, Any]:
    """A step's calibration mapping with defaults filled in; unknown keys and a missing dataset are errors.

    An empty mapping stays empty: the caller then passes a ready :class:`Calibration`.
    """
    if settings == {}:
        return {}
    if not isinstance(settings, dict):
        raise ValueError(f"{label}: calibration must be a mapping such as {{dataset: shapes, n: 128}}")
    unknown = sorted(set(settings) - set(CALIBRATION_KEYS))
    if unknown:
        raise ValueError(f"{label}: unknown calibration setting(s) {unknown}; allowed: {sorted(CALIBRATION_KEYS)}")
    if not settings.get("dataset"):
        raise ValueError(f"{label}: calibration needs a dataset")
    out = {**CALIBRATION_KEYS, **settings}
    if out["split"] not in ("train", "val", "test"):
        raise ValueError(f"{label}: calibration split {out['split']!r} is not one of train, val, test")
    for key in ("n", "batch_size"):
        if not isinstance(out[key], int) or out[key] < 1:
            raise ValueError(f"{label}: calibration {key} must be a positive integer, got {out[key]!r}")
    return out


@dataclass(frozen=True, kw_only=True)
class _CalibratedSpec(SelectionSpec):
    bits: int = 4
    group_size: int | None = None
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"{self._label()}bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"{self._label()}group_size must be a positive integer or null, got {self.group_size!r}")
        object.__setattr__(self, "calibration", calibration_settings(self.calibration, self.method))


@dataclass(frozen=True, kw_only=True)
class GPTQConfig(_CalibratedSpec):
    """Settings of one ``gptq`` step (Frantar et al. 2022); defaults as in the reference implementation."""

    method = "gptq"

    symmetric: bool = False
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damp < 1:
            raise ValueError(f"gptq: damp must be between 0 and 1 (a fraction of the mean diagonal), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"gptq: block_size must be positive, got {self.block_size}")


@dataclass(frozen=True, kw_only=True)
class AWQConfig(_CalibratedSpec):
    """Settings of one ``awq`` step (Lin et al. 2023): 4 bits, groups of 128, a 20-point scale grid."""

    method = "awq"

    bits: int = 4
    group_size: int | None = 128
    n_grid: int = 20
    clip: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_grid < 1:
            raise ValueError(f"awq: n_grid must be positive, got {self.n_grid}")


def _effective_group(ref: ModuleRef, group_size: int | None) -> int | None:
    """The group size for this module, or None (per channel) when the row is not longer than a group."""
    in_features = ref.module.weight.shape[1]
    if group_size is None or group_size >= in_features:
        return None
    if in_features % group_size:
        raise ValueError(
            f"{ref.name}: in_features {in_features} is not a multiple of group_size {group_size}; "
            "choose a group size that divides it or null (per channel)"
        )
    return group_size


def _run_layers(
    model: nn.Module,
    parts: Parts,
    refs: list[ModuleRef],
    calibration: Calibration,
    quantize_group: Any,
) -> dict[str, dict[str, Any]]:
    details: dict[str, dict[str, Any]] = {}
    groups = layer_groups(refs, parts)
    for index, (layer_name, group) in enumerate(groups):
        layer = model.get_submodule(layer_name) if layer_name is not None else None
        details.update(quantize_group(layer, group))
        log.info("quantized layer %d of %d (%s)", index + 1, len(groups), layer_name or group[0].name)
    unchanged = [name for name, d in details.items() if d["elements_changed"] == 0]
    if len(unchanged) == len(details):
        raise ValueError("the step changed no weight element: every selected weight was already on its grid")
    for name in unchanged:
        log.warning("%s: no weight element changed (already on the quantization grid)", name)
    return details


def apply_gptq(
    model: nn.Module, refs: list[ModuleRef], config: GPTQConfig, *, parts: Parts, calibration: Calibration
) -> dict[str, dict[str, Any]]:
    """GPTQ every selected Linear, layer by layer, each layer calibrated after the ones before it."""
    from vlmopt.compress.gptq import HessianAccumulator, gptq_quantize

    def quantize_group(layer: nn.Module | None, group: list[ModuleRef]) -> dict[str, dict[str, Any]]:
        hessians = {ref.name: HessianAccumulator(ref.module.weight.shape[1]) for ref in group}
        capture_layer_inputs(model, layer, group, calibration, lambda ref, x: hessians[ref.name].add(x))
        out = {}
        for ref in group:
            weight = ref.module.weight
            result = gptq_quantize(
                weight.detach(),
                hessians[ref.name].hessian(),
                bits=config.bits,
                group_size=_effective_group(ref, config.group_size),
                sym=config.symmetric,
                act_order=config.act_order,
                static_groups=config.static_groups,
                damp=config.damp,
                block_size=config.block_size,
            )
            new = result.weight.to(weight.dtype)
            changed = int((new != weight).sum())
            with torch.no_grad():
                weight.copy_(new)
            out[ref.name] = {
                "elements_changed": changed,
                "calibration_tokens": hessians[ref.name].n,
                "damp_used": result.damp_used,
                "damp_retries": result.retries,
                "dead_columns": result.dead_columns,
                "hessian_error": result.hessian_error,
            }
            if result.retries:
                log.warning(
                    "%s: Cholesky failed, damping raised to %g (%d retries)", ref.name, result.damp_used, result.retries
                )
        return out

    return _run_layers(model, parts, refs, calibration, quantize_group)


def apply_awq(
    model: nn.Module, refs: list[ModuleRef], config: AWQConfig, *, parts: Parts, calibration: Calibration
) -> dict[str, dict[str, Any]]:
    """AWQ every selected Linear, layer by layer; scales are folded back into the effective weight."""
    from vlmopt.compress.awq import awq_quantize

    def quantize_group(layer: nn.Module | None, group: list[ModuleRef]) -> dict[str, dict[str, Any]]:
        inputs: dict[str, list[torch.Tensor]] = {ref.name: [] for ref in group}
        capture_layer_inputs(model, layer, group, calibration, lambda ref, x: inputs[ref.name].append(x))
        out = {}
        for ref in group:
            weight = ref.module.weight
            x = torch.cat(inputs.pop(ref.name))
            result = awq_quantize(
                weight.detach(),
                x,
                bits=config.bits,
                group_size=_effective_group(ref, config.group_size),
                n_grid=config.n_grid,
                clip=config.clip,
            )
            new = result.weight.to(weight.dtype)
            changed = int((new != weight).sum())
            with torch.no_grad():
                weight.copy_(new)
            out[ref.name] = {"elements_changed": changed, "calibration_tokens": int(x.shape[0]), "alpha": result.alpha}
        return out

    return _run_layers(model, parts, refs, calibration, quantize_group)
