"""AWQ (activation-aware weight quantization): the math for linear layers, and the ``awq`` step.

AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", MLSys 2024, https://arxiv.org/abs/2306.00978) protects the weights that meet large
activations by scaling input channel ``j`` of the weight by ``s_j`` before quantization and
dividing the input by ``s_j``, so the layer computes ``(x / s) @ Q(W * s)^T``. As in the reference
implementation:

- ``s = x_mean^alpha`` with ``x_mean`` the mean of ``|x|`` per input channel over the calibration
  tokens, normalised by ``sqrt(max(s) * min(s))``; ``alpha`` is searched over
  ``0, 1/n_grid, ..., (n_grid - 1)/n_grid`` (``alpha = 0`` is plain round-to-nearest) and the one
  with the smallest output MSE against the float layer is kept (:func:`awq_search_scale`);
- optionally (``clip``), each group's range of the scaled weight is shrunk to
  ``[-r * max|w|, r * max|w|]`` for ``r`` in ``1, 1 - 1/n, ..., 1 - max_shrink + 1/n`` and the
  ``r`` with the smallest error of that group's share of the output kept
  (:func:`awq_search_clip`, the reference's ``auto_clip``; it skips q/k projections, which is the
  caller's choice).

Weights are quantized asymmetrically with an integer zero point, per group of ``group_size``
input columns, on the grid of :mod:`vlmopt.compress.quant`. Several linears that read the same
input (q/k/v, or fc1 of a gated MLP) share one ``s``: search it on their weights concatenated
along dim 0, so the loss is the error of all their outputs together.

:class:`AWQResult` carries both forms of the result: ``scaled_weight`` ``Q(W * s)`` (on the
grid), for a model that folds ``1 / s`` into the op before the layer (a norm's weight and bias, or
the rows of a preceding linear; see :func:`apply_awq`), and ``weight``
``Q(W * s) / s``, the effective weight that computes the same thing where nothing can absorb
``1 / s``. :func:`awq_quantize_weight` returns the latter, so ``inputs @ W'.T`` is what the scaled
layer computes.

An ``awq`` step (:class:`AWQConfig`, :func:`apply_awq`) does this layer by layer on a whole model
(:mod:`vlmopt.compress.calibration`), one scale vector per set of Linears that read the same input,
folded into the op before them where that is exact (:mod:`vlmopt.compress.awq_scales`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmopt.compress.packed import GridRecord, mark_off_grid, record_grid
from vlmopt.compress.step import StepInputs, StepResult

from .awq_scales import _fold_groups, _layer_name, _LayerTrace, _ScaleGroup, _shared_input_groups, _trace_layer
from .calibration import _CalibratedSpec, _effective_group, _run_layers
from .quant import QuantSpec, choose_qparams, count_changed, fake_quantize, weight_quant_spec
from .select import ModuleRef

__all__ = [
    "AWQConfig",
    "AWQResult",
    "apply_awq",
    "awq_quantize",
    "awq_quantize_weight",
    "awq_search_clip",
    "awq_search_scale",
]

log = logging.getLogger(__name__)

# Floor of x_mean^alpha before normalisation, as in the reference implementation.
_MIN_SCALE = 1e-4


@dataclass(frozen=True)
class AWQResult:
    """What :func:`awq_quantize` chose.

    ``weight`` is the effective weight ``Q(clip(W * s)) / s`` and ``scaled_weight`` the quantized
    scaled weight ``Q(clip(W * s))`` itself (values on the grid), both in the input weight's
    dtype. ``scales`` (in_features,) is ``s``: the preceding op's output is divided by it and the
    weight multiplied by it. ``losses`` holds the output MSE for each ``alpha`` of the grid,
    ``loss`` the best of them (before clipping). ``clip_max`` (out_features, n_groups) is the
    bound applied to ``|W * s|`` per group, or None without ``clip``. ``grid_scale``
    (out_features, n_groups) is the step of ``scaled_weight``'s grid in each group: element
    ``(i, j)`` of ``scaled_weight`` lies on a grid of step ``grid_scale[i, group of j]``, and of
    ``weight`` on one of that step divided by ``scales[j]``; ``grid_zero_point`` (same shape) is
    that grid's integer zero point.
    """

    weight: torch.Tensor
    scales: torch.Tensor
    alpha: float
    loss: float
    losses: tuple[float, ...]
    clip_max: torch.Tensor | None
    scaled_weight: torch.Tensor
    grid_scale: torch.Tensor
    grid_zero_point: torch.Tensor


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _check_inputs(weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``inputs`` as (n_tokens, in_features) in the compute dtype, or ValueError."""
    columns = weight.shape[1]
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 2 or inputs.shape[-1] != columns:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be shaped (n_tokens, in_features={columns}), got {shape}")
    if not inputs.is_floating_point():
        raise ValueError(f"inputs must be floating point, got dtype {inputs.dtype}")
    if inputs.numel() == 0:
        raise ValueError("inputs hold no tokens")
    return inputs.detach().reshape(-1, columns).to(device=weight.device, dtype=_compute_dtype(weight))


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _quantize_scaled(
    w: torch.Tensor, spec: QuantSpec, clip_max: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fake-quantize the scaled weight ``w``, clamping each group to ``[-clip_max, clip_max]`` first.

    Returns the grid values and the grid's step and integer zero point per (row, group).
    """
    if clip_max is not None:
        rows, columns = w.shape
        groups = clip_max.shape[1]
        bound = clip_max.unsqueeze(-1)
        w = torch.clamp(w.reshape(rows, groups, columns // groups), -bound, bound).reshape(rows, columns)
    scale, zero_point = choose_qparams(w, spec)
    return fake_quantize(w, spec), scale.reshape(w.shape[0], -1), zero_point.reshape(w.shape[0], -1)


def awq_search_scale(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int | None = 128,
    n_grid: int = 20,
) -> tuple[torch.Tensor, float, tuple[float, ...]]:
    """Per-input-channel scales ``s`` minimising the output MSE of ``Q(W * s) / s`` on ``inputs``.

    Returns ``(s, alpha, losses)`` with ``s`` shaped (in_features,) in the compute dtype and
    ``losses`` the MSE for each ``alpha`` in ``0, 1/n_grid, ..., (n_grid - 1)/n_grid``.
    """
    spec = weight_quant_spec(weight, bits=bits, group_size=group_size, sym=False)
    _check_positive_int("n_grid", n_grid)
    x = _check_inputs(weight, inputs)
    w = weight.detach().to(_compute_dtype(weight))
    x_mean = x.abs().mean(dim=0)
    reference = x @ w.T
    best: tuple[float, float, torch.Tensor] | None = None
    losses = []
    for step in range(n_grid):
        alpha = step / n_grid
        s = x_mean.pow(alpha).clamp(min=_MIN_SCALE)
        s = s / torch.sqrt(s.max() * s.min())
        effective = fake_quantize(w * s, spec) / s
        loss = float((x @ effective.T - reference).pow(2).mean())
        losses.append(loss)
        if best is None or loss < best[0]:
            best = (loss, alpha, s)
    assert best is not None
    return best[2], best[1], tuple(losses)


def awq_search_clip(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int | None = 128,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    max_tokens: int = 512,
    rows_per_chunk: int = 256,
) -> torch.Tensor:
    """Per-group bound on ``|weight|`` that minimises each group's share of the output error.

    ``weight`` and ``inputs`` are the already scaled ones (``W * s`` and ``x / s``). Tries bounds
    ``r * max|w|`` for ``r = 1 - i/n_grid``, ``i < max_shrink * n_grid``, on at most ``max_tokens``
    evenly strided tokens, and returns the best bound per (output row, group), shaped
    (out_features, n_groups).
    """
    weight_quant_spec(weight, bits=bits, group_size=group_size, sym=False)
    _check_positive_int("n_grid", n_grid)
    _check_positive_int("max_tokens", max_tokens)
    _check_positive_int("rows_per_chunk", rows_per_chunk)
    if isinstance(max_shrink, bool) or not isinstance(max_shrink, int | float) or not 0 <= max_shrink < 1:
        raise ValueError(f"max_shrink must be a number in [0, 1), got {max_shrink!r}")
    x = _check_inputs(weight, inputs)
    x = x[:: max(1, x.shape[0] // max_tokens)][:max_tokens]
    rows, columns = weight.shape
    g = columns if group_size is None else group_size
    n_groups = columns // g
    group_spec = QuantSpec(bits, "per_channel", symmetric=False)
    xg = x.reshape(-1, n_groups, g).transpose(0, 1)  # (groups, tokens, g)
    w_all = weight.detach().to(x.dtype).reshape(rows, n_groups, g)
    n_steps = max(1, math.ceil(max_shrink * n_grid))
    result = torch.empty(rows, n_groups, dtype=x.dtype, device=x.device)
    for r1 in range(0, rows, rows_per_chunk):
        w = w_all[r1 : r1 + rows_per_chunk]  # (c, groups, g)
        c = w.shape[0]
        reference = torch.bmm(xg, w.permute(1, 2, 0))  # (groups, tokens, c)
        abs_max = w.abs().amax(dim=-1, keepdim=True)
        best_max = abs_max.clone()
        best_err = torch.full((c, n_groups, 1), math.inf, dtype=x.dtype, device=x.device)
        for step in range(n_steps):
            bound = abs_max * (1 - step / n_grid)
            q = fake_quantize(torch.clamp(w, -bound, bound).reshape(c * n_groups, g), group_spec)
            out = torch.bmm(xg, q.reshape(c, n_groups, g).permute(1, 2, 0))
            err = (out - reference).pow(2).mean(dim=1).T.unsqueeze(-1)  # (c, groups, 1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, bound, best_max)
        result[r1 : r1 + c] = best_max.squeeze(-1)
    return result


def awq_quantize(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int | None = 128,
    n_grid: int = 20,
    clip: bool = False,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
) -> AWQResult:
    """AWQ scale search (and optional clip search) for ``weight`` (out_features, in_features).

    ``inputs`` are calibration inputs (n_tokens, in_features) or (..., in_features). See
    :class:`AWQResult`; for linears that share an input, pass their weights concatenated along
    dim 0. The model-level code folds ``1 / scales`` into the preceding op and stores
    ``scaled_weight``, or stores ``weight`` where no op can absorb the scales.
    """
    spec = weight_quant_spec(weight, bits=bits, group_size=group_size, sym=False)
    if not isinstance(clip, bool):
        raise ValueError(f"clip must be true or false, got {clip!r}")
    x = _check_inputs(weight, inputs)
    s, alpha, losses = awq_search_scale(weight, x, bits=bits, group_size=group_size, n_grid=n_grid)
    w_scaled = weight.detach().to(s.dtype) * s
    clip_max = None
    if clip:
        clip_max = awq_search_clip(
            w_scaled, x / s, bits=bits, group_size=group_size, n_grid=clip_grid, max_shrink=max_shrink
        )
    quantized, grid_scale, grid_zero = _quantize_scaled(w_scaled, spec, clip_max)
    return AWQResult(
        weight=(quantized / s).to(weight.dtype),
        scales=s,
        alpha=alpha,
        loss=min(losses),
        losses=losses,
        clip_max=clip_max,
        scaled_weight=quantized.to(weight.dtype),
        grid_scale=grid_scale,
        grid_zero_point=grid_zero,
    )


def awq_quantize_weight(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int | None = 128,
    n_grid: int = 20,
    clip: bool = False,
) -> torch.Tensor:
    """AWQ effective weight ``Q(clip(W * s)) / s`` in ``weight``'s dtype (see :func:`awq_quantize`)."""
    return awq_quantize(weight, inputs, bits=bits, group_size=group_size, n_grid=n_grid, clip=clip).weight


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


def apply_awq(model: nn.Module, refs: list[ModuleRef], config: AWQConfig, inputs: StepInputs) -> StepResult:
    """AWQ every selected Linear, layer by layer, folding each group's scales where that is exact.

    Linears of a layer that read the same input tensor share one scale vector, searched on their
    weights stacked along dim 0. With ``fold``, ``1 / s`` goes into the norm that produced the
    input (or into the rows of the selected Linear that ran just before, for a later group) and
    the Linears store ``Q(W * s)``; each fold is kept only if the layer's outputs on the
    calibration inputs match those of the unfolded form, which stores ``Q(W * s) / s``.

    With a work folder (``inputs.work``) each finished layer (its weights and folded norms and
    Linears) is checkpointed there and a rerun continues after the last one
    (:mod:`vlmopt.compress.layer_progress`).
    """
    parts, calibration = inputs.parts, inputs.need_calibration("awq")
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
        for g in scale_groups:
            unit = bool((g.result.scales == 1).all()) and not any(r.name in g.row_divisors for r in g.refs)
            if g.folded_into != "weight" or unit:
                # The Linears store Q(W * s) itself (with unit scales, Q(W)): its grid, for packed storage.
                _record_grids(g, config.bits, config.group_size)
            else:
                for ref in g.refs:
                    mark_off_grid(ref.module, "AWQ kept its scales in the weight (no fold), Q(W * s) / s, on no grid")
        steps = _grid_steps(scale_groups)
        out = {}
        for g in scale_groups:
            counts[g.kind] += 1
            counts["rejected"] += g.kind == "weight" and g.candidate is not None
            counts["unit"] += bool((g.result.scales == 1).all())
            for ref in g.refs:
                out[ref.name] = {
                    "elements_changed": count_changed(originals[ref.name], ref.module.weight, steps[ref.name]),
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

    # The counts are kept with the layer checkpoints (inputs.work), so a resumed run logs them all.
    details = _run_layers(model, parts, refs, calibration, quantize_group, method="awq", work=inputs.work, state=counts)
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
    return details, None


def _record_grids(g: _ScaleGroup, bits: int, configured: int | None) -> None:
    """Record the grid of each Linear of a folded group (:func:`vlmopt.compress.packed.record_grid`);
    a Linear that took a later group's scales into its rows is on that grid with narrower scales.
    A row exactly one ``configured`` group long keeps the group strategy (one scheme per variant).
    """
    rows = [ref.module.weight.shape[0] for ref in g.refs]
    scales, zeros = g.result.grid_scale.split(rows), g.result.grid_zero_point.split(rows)
    for ref, scale, zero in zip(g.refs, scales, zeros, strict=True):
        if ref.name in g.row_divisors:  # a later group's scales were folded into its rows
            scale = scale / g.row_divisors[ref.name].reshape(-1, 1).to(scale.dtype)
        columns = ref.module.weight.shape[1]
        group_size = columns // scale.shape[1]
        whole_row = scale.shape[1] == 1 and configured == columns
        strategy = "channel" if scale.shape[1] == 1 and not whole_row else "group"
        record_grid(
            ref.module,
            GridRecord(bits, False, strategy, group_size if strategy == "group" else None, scale, zero),
        )


def _grid_steps(groups: list[_ScaleGroup]) -> dict[str, torch.Tensor]:
    """Each Linear's grid step per weight element, in the form the weight is now stored in.

    A folded group stores ``Q(W * s)``, on its grid's step; an unfolded one ``Q(W * s) / s``,
    whose column ``j`` has that step divided by ``s_j``; a Linear that took a later group's
    scales had its rows divided by them, and so have its steps.
    """
    steps: dict[str, torch.Tensor] = {}
    for g in groups:
        s = g.result.scales
        rows = [ref.module.weight.shape[0] for ref in g.refs]
        for ref, scale in zip(g.refs, g.result.grid_scale.split(rows), strict=True):
            step = scale.repeat_interleave(ref.module.weight.shape[1] // scale.shape[1], dim=1)
            steps[ref.name] = step if g.folded_into != "weight" else step / s
    for g in groups:
        if g.kind == "linear":
            steps[g.folded_into] = steps[g.folded_into] / g.result.scales.reshape(-1, 1)
    return steps


def _search_group(members: list[ModuleRef], trace: _LayerTrace, config: AWQConfig) -> _ScaleGroup:
    """One scale search on the stacked weights of ``members`` and their common calibration input."""
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
