"""Low-bit matrix-multiply kernels for packed variants: real integer weights at run time.

A packed variant (:mod:`vlmopt.compress.packed`) loads as float weights: transformers dequantizes
the packed integers as it reads them, so the model computes exactly what was evaluated but at the
dense model's speed and memory. :func:`use_kernels` replaces each packed Linear of such a model by
one that keeps the integers and multiplies through a weight-only low-bit kernel, where one exists
for its scheme, device and dtype:

``int4-tinygemm`` (CUDA) / ``int4-cpu`` (CPU)
    4 bits in groups of 32, 64, 128 or 256 along the input, symmetric or asymmetric:
    ``torch.ops.aten._weight_int4pack_mm`` (the tinygemm kernel; bfloat16 only) and
    ``_weight_int4pack_mm_for_cpu``. The weight is ``(u - 8) * s + m`` per group, with ``u`` the
    unsigned level (compressed-tensors' signed level + 8) and ``m = -z * s`` (``z`` its signed
    zero point), so the stored levels are used as they are.
``int8-weight-only`` (CUDA and CPU)
    8 bits per output channel, symmetric: ``torch.ops.aten._weight_int8pack_mm``.

Why these: they ship inside torch itself (no package beyond the pinned torch, which keeps the
CPU install and the lent GPU machine's install alike), they are the kernels that torchao's int4
and int8 weight-only layouts call, and the CPU versions run here, so the whole path is tested
without a GPU. torchao 0.18's int4 weight-only config does not run on a CPU; gemlite and Marlin
need CUDA and a package built for the exact torch. The kernels are private ATen operators, so
each replaced Linear is checked once against the dense weight on random input before it is used
(relative error at most :data:`TOLERANCE` for the dtype); a Linear whose check fails, whose
shape the kernel cannot take, or whose scheme has no kernel (2, 3, 5 bits; 8-bit groups;
asymmetric 8-bit) keeps its dense weight, and :class:`KernelUse` says which and why. The
efficiency rows carry the kernel and stay marked ``simulated`` unless every packed Linear runs on
it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmopt.compress.packed import FORMAT, unpack_int32
from vlmopt.compress.sharing import weight_files

__all__ = ["TOLERANCE", "Int4Linear", "Int8Linear", "KernelUse", "kernel_for", "use_kernels"]

log = logging.getLogger(__name__)

#: Largest relative error of a kernel Linear's output against the dense weight's, per dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
#: The group sizes the int4 kernels take.
INT4_GROUPS = (32, 64, 128, 256)
#: No kernel: the packed weights were dequantized and run as dense floats.
NONE = "none"


@dataclass
class KernelUse:
    """Which kernel the packed Linears of a model run on, and why any do not."""

    #: The kernel (``int4-tinygemm``, ``int4-cpu``, ``int8-weight-only``) or ``none``.
    kernel: str = NONE
    #: Packed Linears in the folder.
    packed: int = 0
    #: Names of the Linears that run on the kernel.
    replaced: list[str] = field(default_factory=list)
    #: Packed Linear -> why it keeps its dense weight.
    dense: dict[str, str] = field(default_factory=dict)
    #: Why no Linear runs on a kernel (None when some does).
    reason: str | None = None

    @property
    def complete(self) -> bool:
        """Every packed Linear runs on the kernel."""
        return self.packed > 0 and len(self.replaced) == self.packed

    def describe(self) -> str:
        """One line for logs and the efficiency rows' notes."""
        if not self.replaced:
            return f"no low-bit kernel: {self.reason or 'nothing packed'}"
        text = f"{self.kernel} for {len(self.replaced)} of {self.packed} packed Linears"
        if self.dense:
            reasons = sorted(set(self.dense.values()))
            text += f"; {len(self.dense)} dense ({'; '.join(reasons[:3])}{' ...' if len(reasons) > 3 else ''})"
        return text


def kernel_for(scheme: dict[str, Any], device: torch.device, dtype: torch.dtype) -> tuple[str | None, str | None]:
    """(kernel, None) for a compressed-tensors weight ``scheme`` on ``device`` in ``dtype``, or (None, why not)."""
    bits, strategy, group = scheme.get("num_bits"), scheme.get("strategy"), scheme.get("group_size")
    if scheme.get("type", "int") != "int" or scheme.get("actorder"):
        return None, f"no kernel for {scheme.get('type')} weights with actorder {scheme.get('actorder')}"
    if bits == 4:
        if strategy != "group" or group not in INT4_GROUPS:
            return None, f"the int4 kernels take groups of {list(INT4_GROUPS)}, not {strategy} {group or ''}".rstrip()
        if device.type == "cuda":
            if dtype != torch.bfloat16:
                return None, f"the CUDA int4 kernel (tinygemm) takes bfloat16, the model is {_name(dtype)}"
            return "int4-tinygemm", None
        if device.type == "cpu":
            return "int4-cpu", None
        return None, f"no int4 kernel on {device.type}"
    if bits == 8:
        if strategy != "channel" or not scheme.get("symmetric", False):
            kind = "symmetric" if scheme.get("symmetric") else "asymmetric"
            return None, f"the int8 kernel takes symmetric per-channel scales, not {kind} {strategy}"
        if device.type in ("cuda", "cpu"):
            return "int8-weight-only", None
        return None, f"no int8 kernel on {device.type}"
    return None, f"no kernel for {bits}-bit weights (kernels exist for 4 and 8 bits)"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _KernelLinear(nn.Module):
    """A Linear whose product is a low-bit kernel's (:meth:`_product` on a 2-D input of the kernel's dtype)."""

    in_features: int
    out_features: int
    dtype: torch.dtype

    def _product(self, flat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.dtype).contiguous()
        out = self._product(flat)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int4Linear(_KernelLinear):
    """A Linear whose 4-bit grouped weight is multiplied by torch's int4 kernel (CUDA or CPU)."""

    def __init__(
        self,
        levels: torch.Tensor,
        scale: torch.Tensor,
        minimum: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None,
    ) -> None:
        """``levels``: unsigned ints (out, in) in [0, 16); ``scale`` and ``minimum``: (out, in / group_size),
        so that the weight is ``(levels - 8) * scale + minimum`` per group. All on the target device."""
        super().__init__()
        out_features, in_features = levels.shape
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.dtype = dtype = scale.dtype
        self.cuda_kernel = levels.device.type == "cuda"
        if self.cuda_kernel:
            if out_features % 8:
                raise ValueError(f"the CUDA int4 kernel needs out_features divisible by 8, got {out_features}")
            tiles = next((t for t in (8, 4, 2) if in_features % (t * 16) == 0), None)
            if tiles is None:
                raise ValueError(f"the CUDA int4 kernel needs in_features divisible by 32, got {in_features}")
            nibbles = levels.to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack((nibbles[:, ::2] << 4 | nibbles[:, 1::2]), tiles)
        else:
            if out_features % 16:
                raise ValueError(f"the CPU int4 kernel needs out_features divisible by 16, got {out_features}")
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.to(torch.int32), 1)
        self.register_buffer("weight_packed", packed)
        # (in / group_size, out, 2): scale and minimum of each group.
        self.register_buffer("scales_and_zeros", torch.stack([scale.t(), minimum.t()], dim=-1).contiguous().to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _product(self, flat: torch.Tensor) -> torch.Tensor:
        mm = torch.ops.aten._weight_int4pack_mm if self.cuda_kernel else torch.ops.aten._weight_int4pack_mm_for_cpu
        return mm(flat, self.weight_packed, self.group_size, self.scales_and_zeros)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class Int8Linear(_KernelLinear):
    """A Linear whose 8-bit per-channel weight is multiplied by torch's int8 weight-only kernel."""

    def __init__(self, levels: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        """``levels``: signed ints (out, in) in [-128, 128); ``scale``: (out,), weight = levels * scale."""
        super().__init__()
        self.out_features, self.in_features = levels.shape
        self.dtype = scale.dtype
        self.register_buffer("weight_int8", levels.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.reshape(-1).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _product(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale)


def _tensors(folder: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a saved model's safetensors file(s)."""
    from safetensors import safe_open

    wanted, found = set(names), {}
    for path in weight_files(folder, "cannot run its packed Linears on a kernel"):
        with safe_open(path, framework="pt") as f:
            for key in wanted & set(f.keys()):
                found[key] = f.get_tensor(key)
    return found


def _build(
    kernel: str, module: nn.Linear, tensors: dict[str, torch.Tensor], prefix: str, scheme: dict[str, Any]
) -> nn.Module:
    """The kernel Linear of one packed module, from its stored tensors."""
    bits = scheme["num_bits"]
    rows, columns = tensors[f"{prefix}.weight_shape"].tolist()
    if (rows, columns) != (module.out_features, module.in_features):
        raise ValueError(f"stored shape {(rows, columns)} is not the module's")
    device, dtype = module.weight.device, module.weight.dtype
    offset = 2 ** (bits - 1)
    # compressed-tensors' levels are stored as signed + 2^(bits-1).
    unsigned = unpack_int32(tensors[f"{prefix}.weight_packed"], bits, columns)
    scale = tensors[f"{prefix}.weight_scale"].to(device=device, dtype=dtype)
    bias = module.bias
    if kernel == "int8-weight-only":
        return Int8Linear((unsigned - offset).to(device), scale.reshape(-1), bias)
    groups = columns // scheme["group_size"]
    if scheme.get("symmetric", False):
        zero = torch.zeros(rows, groups, dtype=torch.int64)
    else:
        packed_zero = tensors[f"{prefix}.weight_zero_point"]
        zero = unpack_int32(packed_zero.T.contiguous(), bits, rows).T - offset
    minimum = -zero.to(device=device, dtype=dtype) * scale
    return Int4Linear(unsigned.to(device), scale, minimum, scheme["group_size"], bias)


def _check(kernel_module: nn.Module, dense: nn.Linear) -> float:
    """Relative error of ``kernel_module`` against ``dense`` on random input of the dense dtype."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(4, dense.in_features, generator=generator).to(device=dense.weight.device, dtype=dense.weight.dtype)
    with torch.no_grad():
        want = dense(x).float()
        got = kernel_module(x).float()
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def use_kernels(model: nn.Module, folder: str | Path, *, enabled: bool = True) -> KernelUse:
    """Replace the packed Linears of ``model`` (loaded from the packed variant ``folder``, already on
    its device) by kernel Linears where a kernel takes them; see the module docstring.

    The model changes in place. Its outputs move by at most the kernel's rounding (checked per
    Linear); inference keeps the dense model, so that scores do not depend on the kernel.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "compressed-tensors" or quant.get("format") != FORMAT:
        return KernelUse(reason="the variant is not stored packed")
    groups = quant.get("config_groups") or {}
    targets = {name: group["weights"] for group in groups.values() for name in group.get("targets", [])}
    use = KernelUse(packed=len(targets))
    if not enabled:
        use.reason = "kernels turned off (profiling.kernels: false)"
        return use
    modules = dict(model.named_modules())
    choices: dict[str, tuple[str | None, str | None]] = {}
    for name, scheme in targets.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            choices[name] = (None, "not a Linear in the loaded model")
        else:
            choices[name] = kernel_for(scheme, module.weight.device, module.weight.dtype)
    wanted = [n for n, (k, _) in choices.items() if k]
    keys = [f"{n}.{t}" for n in wanted for t in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")]
    tensors = _tensors(folder, keys) if wanted else {}
    kernels: set[str] = set()
    for name, (kernel, why) in sorted(choices.items()):
        if kernel is None:
            use.dense[name] = why or "no kernel"
            continue
        dense = modules[name]
        try:
            replacement = _build(kernel, dense, tensors, name, targets[name])
            error = _check(replacement, dense)
        except (RuntimeError, ValueError, KeyError, NotImplementedError) as exc:
            use.dense[name] = f"{kernel} refused it: {str(exc).splitlines()[0][:200]}"
            continue
        if not error <= TOLERANCE.get(dense.weight.dtype, 1e-4):
            use.dense[name] = f"{kernel} check failed: relative error {error:.2e} against the dense weight"
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
        use.replaced.append(name)
        kernels.add(kernel)
    use.kernel = "+".join(sorted(kernels)) or NONE
    if not use.replaced:
        use.reason = "; ".join(sorted(set(use.dense.values()))) or "nothing packed"
    log.info("low-bit kernels: %s", use.describe())
    return use
