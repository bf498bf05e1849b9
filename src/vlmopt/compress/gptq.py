"""GPTQ weight quantization: the math for one linear layer, and the ``gptq`` step on a whole model.

GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023, https://arxiv.org/abs/2210.17323) quantizes the columns of a weight
``W`` (out_features, in_features) one at a time and, after each column, spreads that column's
rounding error over the columns not yet quantized so as to minimise ``||X W^T - X W'^T||^2`` on
calibration inputs ``X`` (n_tokens, in_features). It needs only the Hessian of that objective,
``H = 2/n X^T X``, and the upper Cholesky factor of ``H^-1``:

- columns with ``H_ii == 0`` never see a non-zero input; they are zeroed and get ``H_ii = 1``;
- ``damp * mean(diag(H))`` is added to the diagonal; if the Cholesky factorisation still fails,
  the damping is multiplied by 10 and the factorisation retried (see :class:`GPTQResult`);
- with ``act_order`` the columns are processed in order of decreasing ``H_ii`` (ties keep their
  order) and put back in their original order at the end;
- error compensation is applied lazily in blocks of ``block_size`` columns, which gives the same
  result as column-by-column updates but uses matrix products;
- with groups, a group's scale and zero point are chosen when its first column is reached, on
  the weights as updated so far, or, with ``static_groups``, from the original weights before
  any update. Without ``act_order`` group ``k`` holds columns ``[k*g, (k+1)*g)``. With
  ``act_order`` and dynamic groups, a group holds ``g`` consecutive columns in processing
  order; :attr:`GPTQResult.g_idx` maps every original column to its group, as the reference
  implementation's ``g_idx`` does. With ``static_groups`` groups always hold consecutive
  original columns.

Quantization grids are those of :mod:`vlmopt.compress.quant` (min-max, asymmetric with an integer
zero point and 0 in range, or symmetric with ``2^bits - 1`` levels). The Hessian inverse is
computed in float64; the column loop runs in float32 (float64 weights stay float64).

A ``gptq`` step (:class:`GPTQConfig`, :func:`apply_gptq`) does this layer by layer on a whole model
(:mod:`vlmopt.compress.calibration`), with ``X`` in a :class:`HessianAccumulator`; weights stay floats.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmopt.compress.packed import GridRecord, record_grid
from vlmopt.compress.step import StepInputs, StepResult

from .calibration import _CalibratedSpec, _effective_group, _run_layers, capture_layer_inputs
from .quant import QuantSpec, choose_qparams, count_changed, quant_range, weight_quant_spec
from .select import ModuleRef

__all__ = [
    "GPTQCholeskyError",
    "GPTQConfig",
    "GPTQResult",
    "HessianAccumulator",
    "apply_gptq",
    "gptq_quantize",
    "gptq_quantize_weight",
]

log = logging.getLogger(__name__)

# Relative damping tried after a failed factorisation when the requested damping was 0.
_DAMP_AFTER_ZERO = 0.01


class GPTQCholeskyError(RuntimeError):
    """The damped Hessian could not be factorised, even after the allowed retries."""


@dataclass(frozen=True)
class GPTQResult:
    """What :func:`gptq_quantize` produced and how.

    ``weight`` is the dequantized weight in the input weight's dtype and original column order.
    ``scale`` and ``zero_point`` are (out_features, n_groups) in the compute dtype, and ``g_idx``
    (in_features,) gives each original column's group, so that
    ``weight[:, j] == (q[:, j] - zero_point[:, g_idx[j]]) * scale[:, g_idx[j]]`` for integer levels
    ``q``. ``perm`` is the processing order (None without ``act_order``). ``damp_used`` is the
    relative damping that finally worked (``damp * 10**retries``, or from 0.01 when ``damp`` was 0)
    and ``damp_abs`` the value added to the diagonal. ``hessian_error`` is GPTQ's own estimate of
    the added loss, ``sum((w - q)^2 / [H^-1]_jj) / 2`` over all quantized entries.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    g_idx: torch.Tensor
    perm: torch.Tensor | None
    damp_used: float
    damp_abs: float
    retries: int
    hessian_error: float
    dead_columns: int


class HessianAccumulator:
    """Running ``H = 2/n X^T X`` over batches of inputs to one linear layer.

    ``add`` takes inputs shaped (..., in_features), e.g. what a forward hook sees, and counts every
    row (token) in ``n``. The sum is kept in ``dtype`` (float32 by default, as the reference
    implementation does; float64 for very many tokens) on the device of the first batch unless
    ``device`` is given.
    """

    def __init__(
        self, in_features: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive integer, got {in_features!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.in_features = in_features
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self.n = 0
        self._sum: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs shaped (..., in_features)."""
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"inputs must be shaped (..., {self.in_features}), got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"inputs must be floating point, got dtype {x.dtype}")
        rows = x.detach().reshape(-1, self.in_features)
        if self._sum is None:
            device = self.device if self.device is not None else rows.device
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=device)
        rows = rows.to(device=self._sum.device, dtype=self.dtype)
        self._sum.addmm_(rows.T, rows)
        self.n += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        """``2/n X^T X`` over everything added so far, shaped (in_features, in_features)."""
        if self._sum is None or self.n == 0:
            raise ValueError("no inputs were added, so there is no Hessian")
        return self._sum * (2.0 / self.n)


def _check_options(*, act_order: bool, static_groups: bool, damp: float, block_size: int, max_retries: int) -> None:
    for name, value in (("act_order", act_order), ("static_groups", static_groups)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    if isinstance(damp, bool) or not isinstance(damp, int | float) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0 (a fraction of mean(diag(H))), got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")


def _inverse_cholesky(hessian: torch.Tensor, damp: float, max_retries: int) -> tuple[torch.Tensor, float, float, int]:
    """Upper Cholesky factor of ``(H + damping I)^-1``, retrying with 10x damping on failure.

    Returns (factor, relative damping, absolute damping, retries).
    """
    mean_diag = float(hessian.diagonal().mean())
    rel = float(damp)
    for attempt in range(max_retries + 1):
        damped = hessian.clone()
        damped.diagonal().add_(rel * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, rel, rel * mean_diag, attempt
        if attempt < max_retries:
            new_rel = rel * 10 if rel > 0 else _DAMP_AFTER_ZERO
            log.warning("GPTQ: Cholesky failed with damping %.3g; retrying with %.3g", rel, new_rel)
            rel = new_rel
    raise GPTQCholeskyError(
        f"the damped Hessian is not positive definite even with damping {rel:g} x mean(diag(H)) "
        f"after {max_retries} retries; check the calibration inputs for NaN/inf or raise damp"
    )


def _round_column(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return (torch.clamp(torch.round(w / scale) + zero_point, qmin, qmax) - zero_point) * scale


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int | None = None,
    sym: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    static_groups: bool = False,
    max_retries: int = 5,
) -> GPTQResult:
    """GPTQ-quantize ``weight`` (out_features, in_features) given ``hessian = 2/n X^T X``.

    ``group_size=None`` gives one scale per output row. See the module docstring for the
    algorithm and :class:`GPTQResult` for what comes back. Raises :class:`GPTQCholeskyError` if
    the Hessian cannot be factorised with up to ``max_retries`` tenfold increases of ``damp``.
    """
    weight_quant_spec(weight, bits=bits, group_size=group_size, sym=sym)
    _check_options(
        act_order=act_order, static_groups=static_groups, damp=damp, block_size=block_size, max_retries=max_retries
    )
    rows, columns = weight.shape
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (columns, columns):
        shape = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(f"hessian must be shaped (in_features, in_features) = ({columns}, {columns}), got {shape}")
    if not hessian.is_floating_point() or not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian must be a floating-point tensor of finite values")
    if bool((hessian.diagonal() < 0).any()):
        raise ValueError("hessian has negative diagonal entries; it must be 2/n X^T X of real inputs")

    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    col_spec = QuantSpec(bits, "per_channel", symmetric=sym)
    qmin, qmax = quant_range(bits, sym)
    g = columns if group_size is None else group_size
    n_groups = columns // g
    dynamic_groups = group_size is not None and not static_groups

    W = weight.detach().to(dtype).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float64).clone()
    dead = H.diagonal() == 0
    n_dead = int(dead.sum())
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0

    scale = torch.ones(rows, n_groups, dtype=dtype, device=W.device)
    zero_point = torch.zeros(rows, n_groups, dtype=dtype, device=W.device)
    if not dynamic_groups:
        s, z = choose_qparams(W.reshape(rows, n_groups, g).transpose(0, 1).reshape(n_groups * rows, g), col_spec)
        scale.copy_(s.reshape(n_groups, rows).T)
        zero_point.copy_(z.reshape(n_groups, rows).T)

    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    order = perm if perm is not None else torch.arange(columns, device=W.device)
    # Group of the column processed at each position.
    group_at = torch.arange(columns, device=W.device) // g if dynamic_groups else order // g

    upper, damp_used, damp_abs, retries = _inverse_cholesky(H, damp, max_retries)
    Hinv = upper.to(dtype)
    del H, upper

    Q = torch.zeros_like(W)
    losses = torch.zeros(rows, dtype=dtype, device=W.device)
    group_list = group_at.tolist()
    cur_scale = cur_zero = None
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            p = i1 + i
            k = group_list[p]
            if dynamic_groups and p % g == 0:
                # The group's columns as updated by every column quantized so far: those in this
                # block are current in W1; those beyond it still miss this block's pending updates.
                inside = W1[:, i : min(i + g, count)]
                end = min(p + g, columns)
                if end > i2:
                    beyond = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:p, i2:end]
                    inside = torch.cat([inside, beyond], dim=1)
                s, z = choose_qparams(inside, col_spec)
                scale[:, k] = s.reshape(rows)
                zero_point[:, k] = z.reshape(rows)
            if not dynamic_groups or p % g == 0:
                cur_scale, cur_zero = scale[:, k], zero_point[:, k]
            w = W1[:, i]
            q = _round_column(w, cur_scale, cur_zero, qmin, qmax)
            Q[:, p] = q
            err = (w - q) / Hinv1[i, i]
            losses += err * err
            if i + 1 < count:
                W1[:, i + 1 :].addr_(err, Hinv1[i, i + 1 :], alpha=-1)
            Err1[:, i] = err
        if i2 < columns:
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)

    g_idx = torch.empty(columns, dtype=torch.long, device=W.device)
    g_idx[order] = group_at
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return GPTQResult(
        weight=Q.to(weight.dtype),
        scale=scale,
        zero_point=zero_point,
        g_idx=g_idx,
        perm=perm,
        damp_used=damp_used,
        damp_abs=damp_abs,
        retries=retries,
        hessian_error=float(losses.sum()) / 2,
        dead_columns=n_dead,
    )


def gptq_quantize_weight(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    *,
    bits: int,
    group_size: int | None = None,
    sym: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    static_groups: bool = False,
) -> torch.Tensor:
    """GPTQ-quantized weight for calibration ``inputs`` (n_tokens, in_features) or (..., in_features).

    Returns the dequantized weight ``W'`` in ``weight``'s dtype: ``inputs @ W'.T`` is what the
    quantized layer computes (bias aside). See :func:`gptq_quantize` for the options.
    """
    weight_quant_spec(weight, bits=bits, group_size=group_size, sym=sym)
    columns = weight.shape[1]
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 2 or inputs.shape[-1] != columns:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be shaped (n_tokens, in_features={columns}), got {shape}")
    if inputs.numel() == 0:
        raise ValueError("inputs hold no tokens")
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    accumulator = HessianAccumulator(columns, dtype=acc_dtype, device=weight.device)
    accumulator.add(inputs)
    result = gptq_quantize(
        weight,
        accumulator.hessian(),
        bits=bits,
        group_size=group_size,
        sym=sym,
        act_order=act_order,
        damp=damp,
        block_size=block_size,
        static_groups=static_groups,
    )
    return result.weight


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


def apply_gptq(model: nn.Module, refs: list[ModuleRef], config: GPTQConfig, inputs: StepInputs) -> StepResult:
    """GPTQ every selected Linear, layer by layer, each layer calibrated after the ones before it.

    With a work folder (``inputs.work``) each finished layer is checkpointed there and a rerun
    continues after the last one (:mod:`vlmopt.compress.layer_progress`).
    """
    parts, calibration = inputs.parts, inputs.need_calibration("gptq")

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
            changed = count_changed(weight, new, result.scale[:, result.g_idx])
            with torch.no_grad():
                weight.copy_(new)
            group_size = _effective_group(ref, config.group_size)
            # A group as long as the row is one scale per row: kept as a group, so that a variant
            # whose other rows hold several groups is stored with one scheme.
            whole_row = config.group_size is not None and config.group_size == weight.shape[1]
            recorded = config.group_size if whole_row else group_size
            record_grid(
                ref.module,
                GridRecord(
                    bits=config.bits,
                    symmetric=config.symmetric,
                    strategy="channel" if recorded is None else "group",
                    group_size=recorded,
                    scale=result.scale,
                    zero_point=result.zero_point,
                    g_idx=result.g_idx if group_size is not None and config.act_order else None,
                ),
            )
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

    return _run_layers(model, parts, refs, calibration, quantize_group, method="gptq", work=inputs.work), None
