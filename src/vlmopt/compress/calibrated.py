"""GPTQ and AWQ on whole models: calibration-driven, layer by layer, in pipeline order.

The tensor math lives in :mod:`vlmopt.compress.gptq` and :mod:`vlmopt.compress.awq`; this module
walks the selected Linear modules layer by layer (vision, then bridge, then language), captures
each layer's inputs on the calibration batches with every earlier layer already quantized
(:func:`~vlmopt.compress.calibrate.capture_layer_inputs`), and replaces the weights by their
quantized values (simulated: floats on the quantization grid).

AWQ (Lin et al. 2023, https://arxiv.org/abs/2306.00978) runs as in the reference code's
``auto_scale``: the selected Linears of a layer that read the same input tensor (q/k/v, a fused
qkv, the key/value of a cross-attention over image features; found by tensor identity during the
capture, not by name) share one scale vector ``s``, searched on their weights stacked along dim 0.
Where the shared input is the output of a norm inside the layer, ``1 / s`` is folded into the
norm's weight and bias and the Linears store ``Q(W * s)``; a later group can likewise fold into
the rows of the selected Linear that ran before it (v_proj for out_proj, fc1 for fc2 through
ReLU). Each fold is checked by running the layer on its calibration inputs against the unfolded
form and undone if the outputs change (a post-LN norm that also feeds the residual, a GELU
between two Linears). Without a fold the Linears store the effective weight ``Q(W * s) / s``,
which is the layer ``x / s -> Linear(Q(W * s))`` written as one weight. Each module's record
says where its scales went (``scale_folded_into``, ``folded_params``) and with whom it shares them
(``scale_group``); folded norm parameters are ordinary parameters, so the model saves and loads
with ``save_pretrained`` / ``from_pretrained``.

A step names its calibration data: ``calibration: {dataset: shapes, split: train, n: 128}``
(defaults: the train split, 128 samples, batches of 8, seed 0); the caller turns that into a
:class:`~vlmopt.compress.calibrate.Calibration` (see :func:`vlmopt.pipeline.compress_model`).
"""

from __future__ import annotations

import copy
import logging
import math
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
    #: Fold the scales into the preceding norm or Linear where exact; false keeps them all in the weights.
    fold: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_grid < 1:
            raise ValueError(f"awq: n_grid must be positive, got {self.n_grid}")
        if not isinstance(self.fold, bool):
            raise ValueError(f"awq: fold must be true or false, got {self.fold!r}")


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
    """AWQ every selected Linear, layer by layer, folding each group's scales where that is exact.

    Linears of a layer that read the same input tensor share one scale vector, searched on their
    weights stacked along dim 0. With ``fold``, ``1 / s`` goes into the norm that produced the
    input (or into the rows of the selected Linear that ran just before, for a later group) and
    the Linears store ``Q(W * s)``; each fold is kept only if the layer's outputs on the
    calibration inputs match those of the unfolded form, which stores ``Q(W * s) / s``.
    """
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    counts = {"norm": 0, "linear": 0, "weight": 0, "rejected": 0, "unit": 0}

    def quantize_group(layer: nn.Module | None, group: list[ModuleRef]) -> dict[str, dict[str, Any]]:
        trace = _trace_layer(model, layer, _layer_name(model, layer), group, calibration)
        scale_groups = [_search_group(members, trace, config) for members in _shared_input_groups(group, trace)]
        originals = {ref.name: ref.module.weight.detach().clone() for ref in group}
        with torch.no_grad():
            for g in scale_groups:
                for ref, effective in zip(g.refs, g.effective, strict=True):
                    ref.module.weight.copy_(effective)
        if config.fold and layer is not None:
            _fold_groups(model, layer, scale_groups, trace, owners)
        out = {}
        for g in scale_groups:
            counts[g.kind] += 1
            counts["rejected"] += g.kind == "weight" and g.candidate is not None
            counts["unit"] += bool((g.result.scales == 1).all())
            for ref in g.refs:
                out[ref.name] = {
                    "elements_changed": int((ref.module.weight != originals[ref.name]).sum()),
                    "calibration_tokens": int(g.inputs.shape[0]),
                    "alpha": g.result.alpha,
                    "scale_group": [r.name for r in g.refs],
                    "scale_folded_into": g.folded_into,
                    "folded_params": list(g.folded_params),
                    "fold_candidate": g.candidate,
                    "fold_relative_error": g.fold_error,
                }
        for g in scale_groups:
            if g.kind == "linear":
                out[g.folded_into].setdefault("holds_scales_of", []).extend(r.name for r in g.refs)
        return out

    details = _run_layers(model, parts, refs, calibration, quantize_group)
    log.info(
        "awq: %d scale groups: %d folded into norms, %d into linear layers, %d kept in the weights "
        "(%d with the fold rejected by the output check, %d with unit scales)",
        sum(counts[k] for k in ("norm", "linear", "weight")),
        counts["norm"],
        counts["linear"],
        counts["weight"],
        counts["rejected"],
        counts["unit"],
    )
    return details


#: Relative change of a layer's outputs (computed in float32 or wider) up to which a fold counts
#: as exact. Exact folds measure about 1e-7 on the tiny models; a fold through GELU or into a norm
#: that also feeds the residual measures 1e-4 and more.
FOLD_RTOL = 1e-5


@dataclass
class _LayerTrace:
    """What one capture pass saw inside a layer, batch by batch.

    A tensor is identified by its storage address, shape, strides, dtype and device; every tensor
    seen is held until the batch ends, so an address is not reused for another tensor within a
    batch. ``reads`` lists, per selected Linear and call, the id ``(batch, index)`` of its input;
    ``producers`` names the norm whose output a tensor id is; ``inputs`` holds the captured 2-D
    input once per tensor id; ``calls`` holds the layer's positional and keyword arguments per
    batch, with caches removed, so the layer can be run again. ``order`` lists the Linears in the
    order they first ran; ``first_seen`` and ``first_run`` time (by a counter of events) when a
    tensor id first appeared and when a Linear first ran, so a Linear can only have produced (part
    of the way to) a tensor that appeared after it ran.
    """

    reads: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    producers: dict[tuple[int, int], str] = field(default_factory=dict)
    inputs: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    first_seen: dict[tuple[int, int], int] = field(default_factory=dict)
    first_run: dict[str, int] = field(default_factory=dict)
    batch: int = -1
    _clock: int = 0
    _held: list[torch.Tensor] = field(default_factory=list)
    _index: dict[tuple[Any, ...], int] = field(default_factory=dict)
    _last: dict[str, tuple[int, int]] = field(default_factory=dict)

    def new_batch(self) -> None:
        self.batch += 1
        self._held.clear()
        self._index.clear()

    def ident(self, t: torch.Tensor) -> tuple[int, int]:
        key = (t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride())
        self._clock += 1
        if key not in self._index:
            self._index[key] = len(self._held)
            self._held.append(t)
            self.first_seen[self.batch, self._index[key]] = self._clock
        return self.batch, self._index[key]

    def read(self, name: str, x: torch.Tensor) -> None:
        ident = self.ident(x)
        self.reads.setdefault(name, []).append(ident)
        self._last[name] = ident
        if name not in self.order:
            self.order.append(name)
            self.first_run[name] = self._clock

    def store(self, name: str, x: torch.Tensor) -> None:
        self.inputs.setdefault(self._last[name], x)

    def finish(self) -> None:
        self._held.clear()
        self._index.clear()


@dataclass
class _ScaleGroup:
    """Linears sharing one AWQ scale vector, and where that vector ended up."""

    refs: list[ModuleRef]
    inputs: torch.Tensor
    result: Any  # AWQResult of the stacked weights
    grid: list[torch.Tensor]
    effective: list[torch.Tensor]
    norm: str | None
    folded_into: str = "weight"
    folded_params: tuple[str, ...] = ()
    candidate: str | None = None
    fold_error: float | None = None

    @property
    def kind(self) -> str:
        if self.folded_into == "weight":
            return "weight"
        return "norm" if self.folded_into == self.norm else "linear"


def _layer_name(model: nn.Module, layer: nn.Module | None) -> str | None:
    if layer is None:
        return None
    return next(name for name, m in model.named_modules() if m is layer)


def _is_norm(module: nn.Module) -> bool:
    """A module whose output can absorb a per-channel scale: a 1-D ``weight`` and optional 1-D ``bias``."""
    if isinstance(module, nn.Linear) or any(True for _ in module.children()):
        return False
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if not isinstance(weight, nn.Parameter) or weight.ndim != 1 or not weight.is_floating_point():
        return False
    return bias is None or (isinstance(bias, nn.Parameter) and bias.shape == weight.shape)


def _without_caches(value: Any) -> Any:
    """``value`` with key/value cache objects replaced by None, so running a layer again changes no state."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return value
    if isinstance(value, Cache):
        return None
    if isinstance(value, tuple | list):
        return type(value)(_without_caches(v) for v in value)
    return value


def _trace_layer(
    model: nn.Module, layer: nn.Module | None, layer_name: str | None, group: list[ModuleRef], calibration: Calibration
) -> _LayerTrace:
    """Capture the inputs of ``group`` and, inside a layer, which tensors they share and where those came from."""
    trace = _LayerTrace()
    handles = []
    if layer is not None:

        def layer_call(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            trace.new_batch()
            for value in (*args, *kwargs.values()):
                if isinstance(value, torch.Tensor):
                    trace.ident(value)  # the layer's own inputs come from no Linear inside it
            trace.calls.append((_without_caches(args), {k: _without_caches(v) for k, v in kwargs.items()}))

        handles.append(layer.register_forward_pre_hook(layer_call, with_kwargs=True))
        for local, module in layer.named_modules():
            if local and _is_norm(module):

                def produced(_m: nn.Module, _args: Any, output: Any, name: str = f"{layer_name}.{local}") -> None:
                    if isinstance(output, torch.Tensor):
                        trace.producers[trace.ident(output)] = name

                handles.append(module.register_forward_hook(produced))
    else:
        trace.new_batch()

    def make_read(name: str) -> Any:
        def read(_m: nn.Module, args: tuple[Any, ...]) -> None:
            if layer is None:
                trace.new_batch()  # loose modules share nothing: every call is its own input
            trace.read(name, args[0])

        return read

    for ref in group:
        handles.append(ref.module.register_forward_pre_hook(make_read(ref.name), prepend=True))
    try:
        capture_layer_inputs(model, layer, group, calibration, lambda ref, x: trace.store(ref.name, x))
    finally:
        for h in handles:
            h.remove()
        trace.finish()
    missing = [ref.name for ref in group if not trace.reads.get(ref.name)]
    if missing:
        raise ValueError(f"awq: the calibration batches never reached {missing}")
    return trace


def _shared_input_groups(group: list[ModuleRef], trace: _LayerTrace) -> list[list[ModuleRef]]:
    """``group`` split into Linears that read the very same tensors, in the order they first ran."""
    shared: dict[tuple[tuple[int, int], ...], list[ModuleRef]] = {}
    for ref in group:
        shared.setdefault(tuple(trace.reads[ref.name]), []).append(ref)
    return sorted(shared.values(), key=lambda members: min(trace.order.index(r.name) for r in members))


def _search_group(members: list[ModuleRef], trace: _LayerTrace, config: AWQConfig) -> _ScaleGroup:
    """One scale search on the stacked weights of ``members`` and their common calibration input."""
    from vlmopt.compress.awq import awq_quantize

    reads = trace.reads[members[0].name]
    x = torch.cat([trace.inputs[ident] for ident in reads])
    weights = [ref.module.weight.detach() for ref in members]
    result = awq_quantize(
        torch.cat(weights),
        x,
        bits=config.bits,
        group_size=_effective_group(members[0], config.group_size),
        n_grid=config.n_grid,
        clip=config.clip,
    )
    rows = [w.shape[0] for w in weights]
    producers = {trace.producers.get(ident) for ident in reads}
    norm = producers.pop() if len(producers) == 1 else None
    return _ScaleGroup(
        refs=members,
        inputs=x,
        result=result,
        grid=list(result.scaled_weight.split(rows)),
        effective=list(result.weight.split(rows)),
        norm=norm,
    )


def _output_tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, tuple | list):
        return [t for item in output for t in _output_tensors(item)]
    return []


@torch.no_grad()
def _layer_outputs(layer: nn.Module, calls: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[torch.Tensor]:
    was_training = layer.training
    layer.eval()
    try:
        return [t for args, kwargs in calls for t in _output_tensors(layer(*args, **kwargs))]
    finally:
        layer.train(was_training)


def _relative_change(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float | None:
    """``||outputs - reference|| / ||reference||`` over all output tensors, or None when not finite."""
    if len(outputs) != len(reference) or any(o.shape != r.shape for o, r in zip(outputs, reference, strict=True)):
        return None
    diff = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(outputs, reference, strict=True))
    norm = sum(float(r.double().pow(2).sum()) for r in reference)
    change = math.sqrt(diff / norm) if norm > 0 else (0.0 if diff == 0 else math.inf)
    return change if math.isfinite(change) else None


def _linear_candidate(g: _ScaleGroup, groups: list[_ScaleGroup], trace: _LayerTrace) -> ModuleRef | None:
    """The selected Linear that ran last before ``g``'s input appeared, with outputs as wide as that input.

    For out_proj that is v_proj (the attention output is linear in v), for fc2 it is fc1; whether
    what lies between them lets the scales through is for the output check to tell.
    """
    by_name = {ref.name: ref for other in groups for ref in other.refs}
    appeared = trace.first_seen[trace.reads[g.refs[0].name][0]]
    width = g.refs[0].module.weight.shape[1]
    before = [n for n in trace.order if trace.first_run[n] < appeared and n not in {r.name for r in g.refs}]
    return next((by_name[n] for n in reversed(before) if by_name[n].module.weight.shape[0] == width), None)


def _scale_params(name: str, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weight and bias (where present) of a fold target, with their full names."""
    found = ((f"{name}.{key}", getattr(module, key, None)) for key in ("weight", "bias"))
    return [(full, p) for full, p in found if isinstance(p, nn.Parameter)]


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple | list):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def _divide_channels(params: list[nn.Parameter], s: torch.Tensor) -> None:
    """Divide each parameter by ``s`` along its first dimension (norm weight and bias, or Linear rows and bias)."""
    for p in params:
        p.copy_((p.to(s.dtype) / s.reshape(-1, *([1] * (p.ndim - 1)))).to(p.dtype))


class _FoldCheck:
    """Runs a layer on its calibration inputs to tell whether a fold leaves its outputs unchanged.

    Layers held in 16-bit floats are checked on a float32 copy whose unfolded weights are the
    grid values divided by ``s`` without rounding, so that the narrow dtype's rounding neither hides
    an inexact fold nor fails an exact one; trials change only the copy.
    """

    def __init__(
        self, layer: nn.Module, calls: list[tuple[tuple[Any, ...], dict[str, Any]]], groups: list[_ScaleGroup]
    ) -> None:
        dtype = next(layer.parameters()).dtype
        if torch.finfo(dtype).bits >= 32:
            self.probe, self.calls = layer, calls
        else:
            self.probe, self.calls = copy.deepcopy(layer).float(), _cast_floats(calls, torch.float32)
        self._params = {id(p): q for p, q in zip(layer.parameters(), self.probe.parameters(), strict=True)}
        if self.probe is not layer:
            with torch.no_grad():
                for g in groups:
                    for ref, grid in zip(g.refs, g.grid, strict=True):
                        self._params[id(ref.module.weight)].copy_(grid.to(g.result.scales.dtype) / g.result.scales)
        self.reference = _layer_outputs(self.probe, self.calls)

    @torch.no_grad()
    def change(
        self, divided: list[nn.Parameter], members: list[nn.Parameter], grids: list[torch.Tensor], s: torch.Tensor
    ) -> float | None:
        """Relative change of the outputs with ``divided`` divided by ``s`` and ``members`` set to ``grids``."""
        divided = [self._params[id(p)] for p in divided]
        members = [self._params[id(p)] for p in members]
        saved = [p.detach().clone() for p in (*divided, *members)]
        try:
            _divide_channels(divided, s)
            for weight, grid in zip(members, grids, strict=True):
                weight.copy_(grid)
            return _relative_change(_layer_outputs(self.probe, self.calls), self.reference)
        except Exception:  # a fold that breaks the layer is rejected like any other
            return None
        finally:
            for p, old in zip((*divided, *members), saved, strict=True):
                p.copy_(old)


def _fold_groups(
    model: nn.Module, layer: nn.Module, groups: list[_ScaleGroup], trace: _LayerTrace, owners: dict[int, int]
) -> None:
    """Fold each group's scales into its producing norm or preceding Linear where the layer's outputs prove it exact.

    Every group starts in the unfolded form (effective weights ``Q(W * s) / s``), whose outputs
    on the calibration inputs are the reference. A fold divides the norm's weight and bias (or
    the Linear's weight rows and bias) by ``s`` and stores ``Q(W * s)`` in the group's Linears;
    it is kept only if the outputs then differ from the reference by at most :data:`FOLD_RTOL`,
    which fails when the norm's output also feeds a residual (post-LN layers) or an activation
    other than ReLU sits between two Linears. Unit scales (``alpha = 0``) need no fold.
    """
    try:
        check = _FoldCheck(layer, trace.calls, groups)
    except Exception as err:  # any failure to rerun the layer means no fold can be proven
        log.warning("awq: cannot rerun a layer on its calibration inputs (%s); its scales stay in the weights", err)
        return
    used: set[str] = set()
    for g in groups:
        s = g.result.scales
        if bool((s == 1).all()):
            continue
        if g.norm is not None:
            target, params = g.norm, _scale_params(g.norm, model.get_submodule(g.norm))
        elif (producer := _linear_candidate(g, groups, trace)) is not None:
            target, params = producer.name, _scale_params(producer.name, producer.module)
        else:
            continue
        if target in used or any(owners.get(id(p), 0) > 1 for _, p in params):
            continue
        members = [ref.module.weight for ref in g.refs]
        change = check.change([p for _, p in params], members, g.grid, s)
        g.candidate, g.fold_error = target, change
        if change is None or change > FOLD_RTOL:
            log.debug("awq: fold of %s into %s rejected (relative change %s)", [r.name for r in g.refs], target, change)
            continue
        with torch.no_grad():
            _divide_channels([p for _, p in params], s)
            for weight, grid in zip(members, g.grid, strict=True):
                weight.copy_(grid)
        g.folded_into, g.folded_params = target, tuple(name for name, _ in params)
        used.add(target)
