"""Calibration data and the layer-by-layer walk shared by the data-aware methods (GPTQ, AWQ).

:class:`Calibration` holds ready model inputs built from real multimodal samples of a split
(images and the task prompts with their targets), so the vision encoder is calibrated on images
and the language model on the token sequences it sees when it answers. The samples are encoded
where the tasks are known (:func:`vlmopt.tasks.encode.calibration_batches`); this package only
holds the batches.

A step names its calibration data: ``calibration: {dataset: shapes, split: train, n: 128}``
(defaults: the train split, 128 samples, batches of 8, seed 0; see :func:`calibration_settings`);
the caller turns that into a :class:`Calibration` (see :func:`vlmopt.pipeline.compress_model`).

:func:`capture_layer_inputs` runs the model on the calibration batches and hands the inputs of
the selected Linear modules of one layer to a callback, stopping each forward pass as soon as that
layer has run. Called layer after layer, in pipeline order (:func:`layer_groups`), with each layer
quantized before the next is captured, every layer is calibrated on the outputs of the
already-quantized layers before it, as GPTQ prescribes (Frantar et al. 2022,
https://arxiv.org/abs/2210.17323, section 4). ``_run_layers`` is that walk for the whole
selection: the vision layers, then the bridge, then the language model; GPTQ
(:func:`vlmopt.compress.gptq.apply_gptq`) and AWQ (:func:`vlmopt.compress.awq.apply_awq`) pass it
what to do with one layer. Given the step's work folder, the walk checkpoints each finished layer
there and a rerun of a killed job continues after the last one
(:mod:`vlmopt.compress.layer_progress`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmopt.compress.layer_progress import LayerProgress, layer_grids
from vlmopt.compress.quant import CHANGE_TOLERANCE
from vlmopt.compress.select import ModuleRef, Parts, SelectionSpec
from vlmopt.compress.step import StepWork
from vlmopt.data.schema import SPLITS

__all__ = ["CALIBRATION_KEYS", "Calibration", "calibration_settings", "capture_layer_inputs", "layer_groups"]

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
    if out["split"] not in SPLITS:
        raise ValueError(f"{label}: calibration split {out['split']!r} is not one of {', '.join(SPLITS)}")
    for key in ("n", "batch_size"):
        if not isinstance(out[key], int) or out[key] < 1:
            raise ValueError(f"{label}: calibration {key} must be a positive integer, got {out[key]!r}")
    return out


class _LayerDone(Exception):
    """Raised by a hook to stop a forward pass once the layer under calibration has run."""


@dataclass
class Calibration:
    """Model-ready calibration batches (each a dict of tensors for ``model(**batch)``)."""

    batches: list[dict[str, torch.Tensor]]
    #: Where the samples came from, for the manifest.
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)


def layer_groups(refs: list[ModuleRef], parts: Parts) -> list[tuple[str | None, list[ModuleRef]]]:
    """``refs`` grouped by their layer, in pipeline order; modules outside layers come last, one each.

    Each group is ``(layer name or None, refs)``.
    """
    groups: dict[tuple[str, int], list[ModuleRef]] = {}
    loose = []
    for ref in refs:
        if ref.layer_index is None:
            loose.append(ref)
        else:
            groups.setdefault((ref.part, ref.layer_index), []).append(ref)
    order = {part: i for i, part in enumerate(parts)}
    keyed = sorted(groups.items(), key=lambda item: (order.get(item[0][0], len(order)), item[0][1]))
    out: list[tuple[str | None, list[ModuleRef]]] = [(parts[p][i][0], g) for (p, i), g in keyed]
    out += [(None, [ref]) for ref in loose]
    return out


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    layer: nn.Module | None,
    refs: list[ModuleRef],
    calibration: Calibration,
    consume: Callable[[ModuleRef, torch.Tensor], None],
) -> None:
    """Call ``consume(ref, x)`` with the 2-D input (tokens x in_features) of each ref, batch by batch.

    Forward passes stop right after ``layer`` (when given), so later layers cost nothing.
    Padding positions are dropped from the language model's captured inputs (by the batch's
    ``attention_mask``), so calibration statistics do not depend on how samples were batched.
    """
    handles = []
    current_mask: list[torch.Tensor | None] = [None]

    def make_hook(ref: ModuleRef) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            mask = current_mask[0]
            if ref.part == "language" and mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
                x = x[mask.bool()]
            consume(ref, x.reshape(-1, x.shape[-1]).float())

        return hook

    def stop(_module: nn.Module, _args: Any, _output: Any) -> None:
        raise _LayerDone

    try:
        for ref in refs:
            handles.append(ref.module.register_forward_pre_hook(make_hook(ref)))
        if layer is not None:
            handles.append(layer.register_forward_hook(stop))
        was_training = model.training
        model.eval()
        for batch in _on_device(calibration.batches, model):
            current_mask[0] = batch.get("attention_mask")
            try:
                model(**batch)
            except _LayerDone:
                pass
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()


def _on_device(batches: list[dict[str, torch.Tensor]], model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    param = next(model.parameters())
    for batch in batches:
        yield {k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}


@dataclass(frozen=True, kw_only=True)
class _CalibratedSpec(SelectionSpec):
    """Settings shared by the calibrated methods: ``bits``, ``group_size`` and the ``calibration`` data."""

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
    *,
    method: str,
    work: StepWork | None = None,
    state: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """``quantize_group(layer, refs)`` on each layer's selected refs in pipeline order; the merged details.

    Each call returns per-module details holding ``elements_changed``, the elements that moved
    by more than :data:`~vlmopt.compress.quant.CHANGE_TOLERANCE` of their grid step
    (:func:`~vlmopt.compress.quant.count_changed`); a step that changed no element anywhere (e.g.
    the same quantization applied twice, which moves weights by float rounding only) is an error,
    and each module it left unchanged gets a warning.

    With ``work`` (the step's work folder), the walk is checkpointed after each layer
    (:class:`~vlmopt.compress.layer_progress.LayerProgress`) and a rerun continues after the last
    finished layer. A layer changes its selected Linears' weights and the parameters listed in
    their ``folded_params`` details (AWQ's folds); those are what the checkpoint keeps.
    ``state`` (JSON values) is the method's own running record, kept and restored with the details.
    """
    details: dict[str, dict[str, Any]] = {}
    state = {} if state is None else state
    groups = layer_groups(refs, parts)
    labels = [layer_name or group[0].name for layer_name, group in groups]
    progress = LayerProgress(work, method, labels, model) if work is not None else None
    start = progress.resume(model, details, state) if progress is not None else 0
    for index, (layer_name, group) in enumerate(groups[start:], start=start):
        layer = model.get_submodule(layer_name) if layer_name is not None else None
        layer_details = quantize_group(layer, group)
        details.update(layer_details)
        log.info("quantized layer %d of %d (%s)", index + 1, len(groups), labels[index])
        if progress is not None:
            grids = layer_grids(group)
            progress.save(index + 1, _changed_params(model, group, layer_details), details, state, grids)
    unchanged = [name for name, d in details.items() if d["elements_changed"] == 0]
    if len(unchanged) == len(details):
        raise ValueError(
            "the step changed no weight element: every selected weight was already on its grid "
            f"(no element moved by more than {CHANGE_TOLERANCE:g} of its grid step)"
        )
    for name in unchanged:
        log.warning(
            "%s: no weight element changed (already on the quantization grid, to within %g of a step)",
            name,
            CHANGE_TOLERANCE,
        )
    return details


def _changed_params(model: nn.Module, group: list[ModuleRef], details: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The parameters a layer's quantization changed, by full name: the refs' weights and any folds."""
    params = {f"{ref.name}.weight": ref.module.weight for ref in group}
    for name in details:
        for full in details[name].get("folded_params", ()):
            params.setdefault(full, model.get_parameter(full))
    return params
