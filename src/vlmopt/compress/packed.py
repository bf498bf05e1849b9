"""Weight-only integer variants stored as packed integers in the compressed-tensors format.

A weight quantizer (uniform round-to-nearest, GPTQ) leaves each Linear's weight as floats on its
integer grid, ``W = (q - z) * s`` per group, and records that grid on the module
(:func:`record_grid`: bits, symmetric or not, per-channel / per-tensor / groups, ``s``, ``z`` and,
for GPTQ with act-order, each column's group). When the variant is saved, :func:`pack_plan`
recovers each recorded module's integer levels from its weight and checks that they give the
weight back exactly, as the loader will compute it; the modules that pass are written as packed
integers (:func:`packed_state_dict`) with a ``quantization_config`` (:func:`quantization_config`)
in the layout of the ``compressed-tensors`` package ("pack-quantized"), which transformers and vLLM
load::

    <m>.weight_packed       int32 [out, ceil(in * bits / 32)]: levels made unsigned by adding
                            2^(bits-1) to the signed level, packed little-endian along the input
    <m>.weight_scale        [out, in / group] (groups), [out, 1] (channel) or [1] (tensor)
    <m>.weight_zero_point   asymmetric only: the signed zero point; groups and channels pack it
                            like the levels but along the output dimension (int32), a tensor keeps
                            it unpacked (int8)
    <m>.weight_shape        int64 [2]: (out, in)

In compressed-tensors (0.20) levels and zero points are signed, ``[-2^(b-1), 2^(b-1) - 1]``; ours
are signed when symmetric and ``[0, 2^b - 1]`` otherwise, so asymmetric levels and zero points are
shifted by ``2^(b-1)`` (their difference, and so the weight, is unchanged). The loader computes
``(q - z) * s`` with ``s`` cast to the model's dtype.

What the format cannot hold keeps the float ("simulated") weights, and the manifest says why
(:class:`PackPlan`): a weight that no longer lies on its recorded grid (a later step changed it, or
the loader's arithmetic in the model's dtype would give other values), GPTQ act-order groups that
are not contiguous (the format has no per-column group index), a weight shared with another
module (tied embeddings), and a variant whose quantized modules use more than one scheme (bits,
symmetry, granularity) when one of them is asymmetric (below). A packed folder is never written
that would load as something else.

Several schemes (GPTQ with other bits per part) are written as one config group per scheme,
without ``dequantize``: transformers 5.25 with compressed-tensors 0.20 decodes a ``dequantize``
folder with its first group's scheme only, so such a folder would load wrong. Without it,
transformers keeps the modules compressed and decompresses each with its own scheme on the first
forward pass (exactly; ``generate`` called before any forward pass fails instead, until
``model.hf_quantizer.compressor.decompress_model(model)`` runs); :func:`vlmopt.compress.saved.load_variant`
decompresses as it loads. That route cannot load asymmetric modules in 0.20 (it keeps their zero
points unpacked and refuses the packed ones), so mixes with an asymmetric scheme stay float.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "FORMAT",
    "GridRecord",
    "PackPlan",
    "grid_of",
    "mark_off_grid",
    "off_grid",
    "pack_int32",
    "pack_plan",
    "packed_state_dict",
    "quantization_config",
    "record_grid",
    "unpack_int32",
]

#: The compressed-tensors format written.
FORMAT = "pack-quantized"
_ATTR = "_vlmopt_grid"


@dataclass(frozen=True)
class GridRecord:
    """The integer grid a quantizer put a Linear's weight on: ``W[:, j] = (q[:, j] - z[:, g(j)]) * s[:, g(j)]``.

    ``scale`` and ``zero_point`` are shaped (out_features, n_groups): one group per row for
    ``"channel"``, one for the whole tensor for ``"tensor"`` (shape (1, 1)), ``in_features /
    group_size`` for ``"group"``. ``zero_point`` holds integers (0 when symmetric). ``g_idx`` gives
    each input column's group where columns are not grouped in order (GPTQ act-order), else None.
    """

    bits: int
    symmetric: bool
    strategy: str
    group_size: int | None
    scale: torch.Tensor
    zero_point: torch.Tensor
    g_idx: torch.Tensor | None = None

    @property
    def scheme(self) -> tuple[int, bool, str, int | None]:
        return self.bits, self.symmetric, self.strategy, self.group_size


def record_grid(module: nn.Module, record: GridRecord) -> None:
    """Keep ``record`` on ``module`` (replacing any earlier one), for :func:`pack_plan` at save time."""
    if record.strategy not in ("group", "channel", "tensor"):
        raise ValueError(f"strategy must be group, channel or tensor, got {record.strategy!r}")
    setattr(module, _ATTR, record)


def mark_off_grid(module: nn.Module, reason: str) -> None:
    """Note that a quantizer left ``module``'s weight on no integer grid, and why (the save lists it
    among the quantized modules kept float)."""
    setattr(module, _ATTR, reason)


def grid_of(module: nn.Module) -> GridRecord | None:
    """The grid recorded on ``module``, if any."""
    record = getattr(module, _ATTR, None)
    return record if isinstance(record, GridRecord) else None


def off_grid(module: nn.Module) -> str | None:
    """Why a quantizer left ``module`` on no grid (:func:`mark_off_grid`), if it did."""
    record = getattr(module, _ATTR, None)
    return record if isinstance(record, str) else None


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``values`` (rows, columns), each in ``[0, 2^bits)``, densely along the columns:
    element ``i`` of a row takes bits ``[i * bits, (i + 1) * bits)`` of a little-endian bit stream,
    bit ``k`` of the stream is bit ``k % 32`` of word ``k // 32``; int32 (rows, ceil(columns * bits / 32))."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"values must lie in [0, {2**bits}) to pack at {bits} bits")
    rows, columns = v.shape
    words = math.ceil(columns * bits / 32)
    out = torch.empty(rows, words, dtype=torch.int32)
    shifts = torch.arange(bits, dtype=torch.int64)
    weights = torch.arange(32, dtype=torch.int64)
    for start in range(0, rows, 1024):  # bounded memory: a stream of bits per element
        block = v[start : start + 1024]
        stream = ((block.unsqueeze(-1) >> shifts) & 1).reshape(block.shape[0], columns * bits)
        stream = nn.functional.pad(stream, (0, words * 32 - columns * bits))
        packed = (stream.reshape(block.shape[0], words, 32) << weights).sum(-1)
        out[start : start + 1024] = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return out


def unpack_int32(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: the unsigned values, int64 (rows, ``columns``)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    stream = ((words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1).reshape(packed.shape[0], -1)
    stream = stream[:, : columns * bits].reshape(packed.shape[0], columns, bits)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(-1)


@dataclass
class _Packed:
    """One module's levels and grid, ready to write."""

    record: GridRecord
    levels: torch.Tensor  # ours, int64 (out, in)


@dataclass
class PackPlan:
    """Which recorded modules a save writes packed, and why the others stay float."""

    #: Module name -> its levels and grid.
    packed: dict[str, _Packed] = field(default_factory=dict)
    #: Module name -> why its float weight is kept although a quantizer recorded a grid.
    kept: dict[str, str] = field(default_factory=dict)
    #: Why nothing is packed at all (None when some module is).
    reason: str | None = None

    def summary(self) -> dict[str, Any]:
        """The manifest's ``storage`` entry."""
        if not self.packed:
            out: dict[str, Any] = {"format": "float"}
            if self.reason:
                out["reason"] = self.reason
            if self.kept:
                out["kept_float"] = dict(sorted(self.kept.items()))
            return out
        import compressed_tensors

        schemes = self.schemes()
        described = [
            {"bits": bits, "symmetric": sym, "strategy": strategy, "group_size": group_size, "modules": len(names)}
            for (bits, sym, strategy, group_size), names in schemes.items()
        ]
        out = {
            "format": FORMAT,
            "compressed_tensors": compressed_tensors.__version__,
            "packed_modules": len(self.packed),
        }
        if len(described) == 1:
            out["scheme"] = {k: v for k, v in described[0].items() if k != "modules"}
        else:
            out["schemes"] = described
            out["loading"] = (
                "several schemes: plain transformers decompresses on the first forward pass; call "
                "model.hf_quantizer.compressor.decompress_model(model) before generate"
            )
        return {**out, **({"kept_float": dict(sorted(self.kept.items()))} if self.kept else {})}

    def schemes(self) -> dict[tuple[int, bool, str, int | None], list[str]]:
        """Each scheme of the packed modules and their names: grouped strategies first, then by bits."""
        out: dict[tuple[int, bool, str, int | None], list[str]] = {}
        for name, item in sorted(self.packed.items()):
            out.setdefault(item.record.scheme, []).append(name)
        order = sorted(out, key=lambda s: (s[2] != "group", s[2], s[0], not s[1], s[3] or 0))
        return {scheme: out[scheme] for scheme in order}


def _column_groups(record: GridRecord, columns: int) -> torch.Tensor:
    """Each input column's group index."""
    if record.g_idx is not None:
        return record.g_idx.to(torch.int64).cpu()
    if record.strategy == "group":
        assert record.group_size is not None
        return torch.arange(columns) // record.group_size
    return torch.zeros(columns, dtype=torch.int64)


def _levels(weight: torch.Tensor, record: GridRecord) -> tuple[torch.Tensor | None, str | None]:
    """The integer levels of ``weight`` on ``record``'s grid, or None and why it is not on that grid
    as the loader computes it (``(q - z) * s`` with ``s`` in the weight's dtype)."""
    w = weight.detach().cpu()
    rows, columns = w.shape
    groups = _column_groups(record, columns)
    scale = record.scale.detach().cpu().to(torch.float64)
    zero = record.zero_point.detach().cpu().to(torch.float64)
    if record.strategy == "tensor":
        scale, zero = scale.reshape(1, 1).expand(rows, 1), zero.reshape(1, 1).expand(rows, 1)
    s, z = scale[:, groups], zero[:, groups]
    half = 2 ** (record.bits - 1)
    qmin, qmax = (-half, half - 1) if record.symmetric else (0, 2 * half - 1)
    levels = (torch.round(w.to(torch.float64) / s) + z).clamp(qmin, qmax).to(torch.int64)
    # The loader's arithmetic: the scale cast to the model's dtype, (q - z) * s in that dtype.
    s_loaded = record.scale.detach().cpu().to(w.dtype)
    if record.strategy == "tensor":
        s_loaded = s_loaded.reshape(1, 1).expand(rows, 1)
    rebuilt = (levels - z.to(torch.int64)).to(w.dtype) * s_loaded[:, groups]
    if not torch.equal(rebuilt, w):
        wrong = int((rebuilt != w).sum())
        return None, (
            f"its weight is not on its recorded grid as the loader computes it in {w.dtype} ({wrong} of "
            f"{w.numel()} elements differ): it changed after it was quantized (AWQ folding a later group's "
            "scales into it, a later step), or its scales are not exact in that dtype"
        )
    return levels, None


def pack_plan(model: nn.Module, *, refuse: str | None = None) -> PackPlan:
    """Decide which Linears of ``model`` with a recorded grid are written packed (see the module
    docstring); ``refuse`` (a reason) keeps every one of them float."""
    plan = PackPlan()
    if refuse is not None:
        plan.kept = {name: refuse for name, module in model.named_modules() if grid_of(module) or off_grid(module)}
        plan.reason = refuse
        return plan
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    candidates: dict[str, _Packed] = {}
    for name, module in model.named_modules():
        if (why := off_grid(module)) is not None:
            plan.kept[name] = why
            continue
        record = grid_of(module)
        if record is None:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            plan.kept[name] = "it is no longer a Linear with a 2-D weight"
            continue
        if owners.get(id(weight), 0) > 1:
            plan.kept[name] = "its weight is shared with another module (tied), which the format cannot hold"
            continue
        if record.strategy == "group" and weight.shape[1] % (record.group_size or 1):
            plan.kept[name] = f"its {weight.shape[1]} input columns are not whole groups of {record.group_size}"
            continue
        if record.g_idx is not None:
            contiguous = record.group_size is not None and torch.equal(
                record.g_idx.cpu().to(torch.int64), torch.arange(weight.shape[1]) // record.group_size
            )
            if not contiguous:
                plan.kept[name] = (
                    "act-order groups are not contiguous columns, and compressed-tensors has no per-column "
                    "group index (use static_groups: true to pack GPTQ with act-order)"
                )
                continue
        levels, why = _levels(weight, record)
        if levels is None:
            plan.kept[name] = why or "not on its grid"
            continue
        candidates[name] = _Packed(record, levels)
    schemes = {p.record.scheme for p in candidates.values()}
    if len(schemes) > 1 and not all(symmetric for _, symmetric, _, _ in schemes):
        listed = ", ".join(_describe(scheme) for scheme in sorted(schemes, key=str))
        plan.reason = (
            f"its quantized modules use {len(schemes)} schemes ({listed}), one of them asymmetric; transformers "
            "with compressed-tensors 0.20 decodes a folder of several schemes with the first one when it "
            "dequantizes on load, and cannot load asymmetric modules otherwise, so the float weights are kept"
        )
        plan.kept.update({name: "several schemes, one asymmetric" for name in candidates})
        return plan
    plan.packed = candidates
    if not candidates:
        plan.reason = "no quantized module can be stored packed" if plan.kept else "no module was quantized"
    return plan


def _describe(scheme: tuple[int, bool, str, int | None]) -> str:
    bits, symmetric, strategy, group_size = scheme
    kind = "symmetric" if symmetric else "asymmetric"
    return f"{bits} bits {kind} {strategy}" + (f" {group_size}" if group_size else "")


def _signed(values: torch.Tensor, record: GridRecord) -> torch.Tensor:
    """compressed-tensors' signed integers for our levels or zero points."""
    return values if record.symmetric else values - 2 ** (record.bits - 1)


def packed_state_dict(model: nn.Module, plan: PackPlan) -> dict[str, torch.Tensor]:
    """``model``'s state dict with each packed module's ``weight`` replaced by its packed tensors."""
    state = model.state_dict()
    for name, item in plan.packed.items():
        record, levels = item.record, item.levels
        rows, columns = levels.shape
        offset = 2 ** (record.bits - 1)
        del state[f"{name}.weight"]
        state[f"{name}.weight_packed"] = pack_int32(_signed(levels, record) + offset, record.bits)
        scale = record.scale.detach().cpu().to(model.get_submodule(name).weight.dtype)
        state[f"{name}.weight_scale"] = scale.reshape(1) if record.strategy == "tensor" else scale.contiguous()
        state[f"{name}.weight_shape"] = torch.tensor([rows, columns], dtype=torch.int64)
        if not record.symmetric:
            zero = _signed(record.zero_point.detach().cpu().round().to(torch.int64), record)
            if record.strategy == "tensor":
                state[f"{name}.weight_zero_point"] = zero.reshape(1).to(torch.int8)
            else:
                state[f"{name}.weight_zero_point"] = pack_int32((zero + offset).T, record.bits).T.contiguous()
    return state


def quantization_config(plan: PackPlan) -> dict[str, Any]:
    """The ``quantization_config`` of config.json for ``plan``'s packed modules: one config group
    per scheme, each naming its modules exactly, so that nothing else is read as quantized.

    With one scheme, ``dequantize: true`` has transformers turn the packed weights back into
    floats as it loads them (on any device; the asymmetric layouts load only that way in
    compressed-tensors 0.20). With several, it is left out (see the module docstring). A serving
    stack with low-bit kernels (vLLM) reads the same tensors as they are.
    """
    if not plan.packed:
        raise ValueError("nothing to pack")
    groups = {}
    schemes = plan.schemes()
    for index, ((bits, symmetric, strategy, group_size), names) in enumerate(schemes.items()):
        weights = {
            "num_bits": bits,
            "type": "int",
            "symmetric": symmetric,
            "strategy": strategy,
            "group_size": group_size if strategy == "group" else None,
            "dynamic": False,
            "actorder": None,
            "observer": "minmax",
        }
        groups[f"group_{index}"] = {"targets": names, "weights": weights, "format": FORMAT}
    config = {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": [],
    }
    if len(schemes) == 1:
        config["dequantize"] = True
    return config
