"""Simulated activation quantization: the input of a selected Linear is fake-quantized per token.

A ``uniform`` step with ``activation_bits`` set also quantizes what its modules read: a forward
pre-hook replaces the input ``x`` by ``dequantize(quantize(x))`` with one min-max scale (and zero
point, unless the step is ``symmetric``) per token, computed on the fly from that token's values
(dynamic quantization). Together with the step's weight quantization the layer then computes
what a W\\ *b*\\ A\\ *a* integer kernel would compute, as in the W8A8 / W4A8 settings of
LLM.int8() and SmoothQuant; nothing is faster or smaller, the point is the quality it costs.

Scales are per token, not per tensor, on purpose: a per-tensor scale taken over a batch depends
on the other samples in the batch (and on their padding), so the same image would get different
predictions at different batch sizes. A per-token scale depends on that token alone.

Hooks are not part of a saved checkpoint. The manifest records, per module, the activation
width; :func:`restore_activation_quant` re-attaches the hooks to a loaded model, following the
names of layers renumbered by a later ``prune_layers`` step.

References: Dettmers et al., "LLM.int8()", NeurIPS 2022, https://arxiv.org/abs/2208.07339;
Xiao et al., "SmoothQuant", ICML 2023, https://arxiv.org/abs/2211.10438 (per-token dynamic
activation scales).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vlmopt.compress.prune_layers import final_name
from vlmopt.compress.quant import QuantSpec, fake_quantize

__all__ = ["ActivationQuantizer", "activation_quantizer", "quantize_inputs", "restore_activation_quant"]

_ATTR = "_vlmopt_activation_quantizer"


class ActivationQuantizer:
    """Forward pre-hook that fake-quantizes a module's first positional input per token."""

    def __init__(self, bits: int, symmetric: bool = False) -> None:
        # Validates bits (2..8) and symmetric; per_channel on the (tokens, features) view = per token.
        self.spec = QuantSpec(bits=bits, granularity="per_channel", symmetric=symmetric)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            return None
        x = args[0]
        tokens = x.reshape(-1, x.shape[-1])
        return (fake_quantize(tokens, self.spec).reshape(x.shape), *args[1:])

    def describe(self) -> dict[str, Any]:
        return {"activation_bits": self.spec.bits, "activation_scale": "per_token", "symmetric": self.spec.symmetric}


def activation_quantizer(module: nn.Module) -> ActivationQuantizer | None:
    """The quantizer attached to ``module``'s input, or None."""
    entry = getattr(module, _ATTR, None)
    return entry[0] if entry is not None else None


def quantize_inputs(module: nn.Module, bits: int, *, symmetric: bool = False, name: str = "") -> ActivationQuantizer:
    """Attach a per-token input quantizer to ``module``; an error if it already has one."""
    if activation_quantizer(module) is not None:
        raise ValueError(
            f"{name or type(module).__name__} already quantizes its input "
            f"({activation_quantizer(module).spec.bits} bits); one activation width per module"
        )
    quantizer = ActivationQuantizer(bits, symmetric)
    handle = module.register_forward_pre_hook(quantizer)
    setattr(module, _ATTR, (quantizer, handle))
    return quantizer


def restore_activation_quant(model: nn.Module, manifest: Mapping[str, Any]) -> list[str]:
    """Re-attach the input quantizers a manifest records to a freshly loaded ``model``.

    Every module a step recorded with ``activation_bits`` gets its quantizer again, under its final
    name (a later ``prune_layers`` step renumbers layers; a module it removed is skipped). Returns
    the names, in order. Raises ``ValueError`` if a recorded module is missing from the model.
    """
    entries = list(manifest.get("steps", []))
    names = []
    for index, entry in enumerate(entries):
        symmetric = bool(entry.get("settings", {}).get("symmetric", False))
        for record in entry.get("modules", []):
            bits = record.get("activation_bits")
            if bits is None:
                continue
            name = final_name(record["name"], entries[index + 1 :])
            if name is None:
                continue
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"the manifest quantizes the input of {name}, which the model does not have") from None
            # A kept LoRA adapter wraps the Linear; the quantizer sat on the Linear, not on the adapter.
            module = getattr(module, "base_layer", module)
            quantize_inputs(module, int(bits), symmetric=symmetric, name=name)
            names.append(name)
    return names
