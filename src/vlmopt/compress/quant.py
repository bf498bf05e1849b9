"""Round-to-nearest affine quantization of weight tensors, as pure tensor functions.

Nothing here knows about models: each function takes a tensor and a :class:`QuantSpec` and
returns tensors, so the math is tested on plain tensors. Scales are chosen by min-max per block:

- ``per_tensor``: one block for the whole tensor;
- ``per_channel``: one block per output row (dimension 0);
- ``group``: blocks of ``group_size`` consecutive input columns within each row. A row whose
  length is not a multiple of ``group_size`` gets a shorter last group (padded with zeros, which
  never changes that group's range, see below).

Asymmetric (the default) uses integers ``[0, 2^bits - 1]`` and an integer zero point, with the
range widened to contain 0 so that 0 is exactly representable (as PyTorch observers and GPTQ
do). Symmetric uses ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]`` with zero point 0, i.e.
``2^bits - 1`` levels spaced ``max|w| / (2^(bits-1) - 1)`` apart. In both, every value inside the
block's range is reproduced to within ``scale / 2``. A block that is all zeros gets scale 1, so
nothing divides by zero. Math runs in float32 (float64 inputs stay float64).

A quantizer's "elements changed" counts elements that moved by more than
:data:`CHANGE_TOLERANCE` of their own grid step (:func:`grid_step`, :func:`count_changed`):
rounding a weight that is already on its grid moves it by float rounding only (about 1e-5 of a
step in float32), which is not a change.

Background: Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018, https://arxiv.org/abs/1712.05877.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "CHANGE_TOLERANCE",
    "GRANULARITIES",
    "QuantSpec",
    "choose_qparams",
    "count_changed",
    "dequantize",
    "fake_quantize",
    "grid_step",
    "quant_range",
    "quantize",
    "rtn_quantize_weight",
    "weight_quant_spec",
]

GRANULARITIES = ("per_channel", "per_tensor", "group")

#: An element of a quantized weight counts as changed only when it moved by more than this
#: fraction of its grid step (the scale of its block). Re-rounding a weight that is already on
#: its grid moves elements by float rounding alone, about 1e-5 of a step in float32; a real
#: rounding moves almost every element by a sizeable fraction of a step (up to one half).
CHANGE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one weight tensor."""

    bits: int
    granularity: str = "per_channel"
    group_size: int | None = None
    symmetric: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits!r} is not allowed; integer quantization uses 2..8 bits")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity={self.granularity!r} is not allowed; choose one of {', '.join(GRANULARITIES)}"
            )
        if self.granularity == "group":
            g = self.group_size
            if isinstance(g, bool) or not isinstance(g, int) or g < 1:
                raise ValueError(f"granularity='group' needs a positive integer group_size, got {g!r}")
        elif self.group_size is not None:
            raise ValueError(
                f"group_size={self.group_size!r} only applies to granularity='group', not {self.granularity!r}"
            )
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be true or false, got {self.symmetric!r}")


def quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest integer level."""
    if symmetric:
        top = 2 ** (bits - 1) - 1
        return -top, top
    return 0, 2**bits - 1


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _blocks(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``w`` as (rows, groups, group length), zero-padding a short last group."""
    w = w.to(_compute_dtype(w))
    if spec.granularity == "per_tensor":
        return w.reshape(1, 1, -1)
    if w.ndim < 2:
        raise ValueError(f"granularity={spec.granularity!r} needs a tensor with rows, got shape {tuple(w.shape)}")
    rows = w.reshape(w.shape[0], -1)
    if spec.granularity == "per_channel":
        return rows.unsqueeze(1)
    g = spec.group_size
    assert g is not None
    pad = (-rows.shape[1]) % g
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(rows.shape[0], -1, g)


def _unblock(blocks: torch.Tensor, like: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Inverse of :func:`_blocks`: drop the padding and restore ``like``'s shape."""
    flat = blocks.reshape(blocks.shape[0], -1)
    if spec.granularity != "per_tensor":
        flat = flat[:, : like.numel() // like.shape[0]]
    return flat.reshape(like.shape)


def choose_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max ``(scale, zero_point)`` per block, each shaped (rows, groups, 1).

    ``zero_point`` is an integer-valued tensor in the compute dtype (0 when symmetric).
    """
    blocks = _blocks(w, spec)
    qmin, qmax = quant_range(spec.bits, spec.symmetric)
    if spec.symmetric:
        scale = blocks.abs().amax(dim=-1, keepdim=True) / qmax
        zero_point = torch.zeros_like(scale)
    else:
        lo = blocks.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = blocks.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not spec.symmetric:
        zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point


def quantize(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer levels of ``w``, same shape as ``w`` (int8 when symmetric, uint8 otherwise)."""
    qmin, qmax = quant_range(spec.bits, spec.symmetric)
    q = torch.clamp(torch.round(_blocks(w, spec) / scale) + zero_point, qmin, qmax)
    return _unblock(q, w, spec).to(torch.int8 if spec.symmetric else torch.uint8)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Real values ``(q - zero_point) * scale`` of the integer levels ``q``, in ``dtype``."""
    blocks = _blocks(q.to(scale.dtype), spec)
    return _unblock((blocks - zero_point) * scale, q, spec).to(dtype)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype: the weight a real quantized kernel would see."""
    scale, zero_point = choose_qparams(w, spec)
    return dequantize(quantize(w, scale, zero_point, spec), scale, zero_point, spec, dtype=w.dtype)


def grid_step(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Each element's grid step: the min-max scale of its block, shaped like ``w``, in the compute dtype."""
    blocks = _blocks(w, spec)
    scale, _ = choose_qparams(w, spec)
    return _unblock(scale.expand_as(blocks), w, spec)


def count_changed(old: torch.Tensor, new: torch.Tensor, step: torch.Tensor) -> int:
    """How many elements of ``new`` moved away from ``old`` by more than :data:`CHANGE_TOLERANCE` x ``step``.

    ``step`` is each element's grid step (broadcastable to ``old``; see :func:`grid_step`). The
    difference is taken in float32 (float64 when either side is float64), so moves smaller than
    that are float rounding and do not count.
    """
    if old.shape != new.shape:
        raise ValueError(f"shapes differ: {tuple(old.shape)} before, {tuple(new.shape)} after")
    dtype = torch.float64 if torch.float64 in (old.dtype, new.dtype) else torch.float32
    moved = (new.detach().to(dtype) - old.detach().to(dtype)).abs()
    return int((moved > CHANGE_TOLERANCE * step.to(device=moved.device, dtype=dtype)).sum())


def weight_quant_spec(
    weight: torch.Tensor, *, bits: int, group_size: int | None = None, sym: bool = False
) -> QuantSpec:
    """Check the arguments shared by the weight-only quantizers (RTN, GPTQ, AWQ) and build their spec.

    ``weight`` must be a 2-D floating tensor shaped (out_features, in_features). ``group_size=None``
    means one scale per output row; otherwise ``group_size`` must be a positive integer dividing
    ``in_features``, so every group is a full group (as GPTQ and AWQ kernels expect).
    """
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D tensor (out_features, in_features), got {shape}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got dtype {weight.dtype}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight is empty: shape {tuple(weight.shape)}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits={bits!r} is not allowed; weight quantization uses 2..8 bits")
    if not isinstance(sym, bool):
        raise ValueError(f"sym must be true or false, got {sym!r}")
    if group_size is None:
        return QuantSpec(bits, "per_channel", symmetric=sym)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
    in_features = weight.shape[1]
    if in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
    return QuantSpec(bits, "group", group_size=group_size, symmetric=sym)


def rtn_quantize_weight(
    weight: torch.Tensor, *, bits: int, group_size: int | None = None, sym: bool = False
) -> torch.Tensor:
    """Round-to-nearest fake quantization of a linear weight (out_features, in_features).

    One min-max scale per output row when ``group_size`` is None, else per ``group_size``
    consecutive input columns of each row. Returns the dequantized weight in ``weight``'s dtype,
    the baseline that GPTQ and AWQ are measured against.
    """
    spec = weight_quant_spec(weight, bits=bits, group_size=group_size, sym=sym)
    return fake_quantize(weight, spec)
