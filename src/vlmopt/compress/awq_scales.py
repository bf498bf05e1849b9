"""AWQ scales on a whole model: one scale vector per set of Linears sharing an input, and its fold.

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

:func:`vlmopt.compress.awq.apply_awq` runs these pieces on each layer in turn: ``_trace_layer``
captures the layer's inputs and which norm produced each, ``_shared_input_groups`` splits the
selected Linears into those that read the same input (each set gets one scale vector, a
``_ScaleGroup``), and ``_fold_groups`` folds the scales where the output check
(:data:`FOLD_RTOL`) proves the fold exact.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmopt.compress.calibration import Calibration, capture_layer_inputs
from vlmopt.compress.select import ModuleRef

__all__ = ["FOLD_RTOL"]

log = logging.getLogger(__name__)


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
    #: Per Linear of ``refs`` (by name): the scales of a later group folded into its rows, by which
    #: its grid's scales are divided (its weight stays on that narrower grid).
    row_divisors: dict[str, torch.Tensor] = field(default_factory=dict)

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


def _keep_on_grid(target: str, s: torch.Tensor, groups: list[_ScaleGroup]) -> None:
    """After a fold divided the rows of the Linear ``target`` by ``s``: where that Linear stores its
    own group's grid values (its group folded too), put it on the same grid with each row's scales
    divided by ``s``, computed as a loader of packed weights computes it (the levels times the
    scale, in the weight's dtype), and note the divisor for the grid record. The result differs
    from the plain division by float rounding only."""
    owner = next((h for h in groups if h.folded_into != "weight" and any(r.name == target for r in h.refs)), None)
    if owner is None:
        return
    index = next(i for i, r in enumerate(owner.refs) if r.name == target)
    rows = [r.module.weight.shape[0] for r in owner.refs]
    start = sum(rows[:index])
    grid_scale = owner.result.grid_scale[start : start + rows[index]]
    scale = grid_scale.to(torch.float64)
    zero = owner.result.grid_zero_point[start : start + rows[index]].to(torch.float64)
    weight = owner.refs[index].module.weight
    columns = weight.shape[1] // scale.shape[1]
    zero_columns = zero.repeat_interleave(columns, dim=1)
    levels = torch.round(owner.grid[index].to(torch.float64) / scale.repeat_interleave(columns, dim=1)) + zero_columns
    # The same division as the grid record's (vlmopt.compress.awq._record_grids), in the grid's dtype.
    narrower = (grid_scale / s.reshape(-1, 1).to(grid_scale.dtype)).to(weight.dtype)
    rebuilt = (levels - zero_columns).to(weight.dtype) * narrower.repeat_interleave(columns, dim=1)
    weight.copy_(rebuilt)
    owner.row_divisors[target] = s.detach().clone()


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
            if g.norm is None:
                _keep_on_grid(target, s, groups)
        g.folded_into, g.folded_params = target, tuple(name for name, _ in params)
        used.add(target)
