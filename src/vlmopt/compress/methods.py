"""The compression methods: one :class:`Method` entry per method in :data:`METHODS`.

Adding a method is one module (its config class, a :class:`~vlmopt.compress.select.SelectionSpec`,
and its handler, see :mod:`vlmopt.compress.step`) and one entry here; docs/extending.md walks
through it. An entry says what the step does to the model's accounting (``bits``, ``simulated``,
``structural``), what data it needs (``calibrated``, ``trained``), and how a saved folder of it is
loaded back (:mod:`vlmopt.compress.saved`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from vlmopt.compress.activations import restore_activation_quant
from vlmopt.compress.awq import AWQConfig, apply_awq
from vlmopt.compress.dynamic_int8 import DynamicInt8Config, apply_dynamic_int8, torchao_version
from vlmopt.compress.gptq import GPTQConfig, apply_gptq
from vlmopt.compress.lora import LoRAConfig, apply_lora, restore_adapters, save_adapters
from vlmopt.compress.precision import PrecisionConfig, apply_precision, precision_dtype
from vlmopt.compress.prune_heads import PruneHeadsConfig, apply_prune_heads
from vlmopt.compress.prune_heads_saved import load_head_pruned, restore_pruned_heads
from vlmopt.compress.prune_layers import PruneLayersConfig, apply_prune_layers
from vlmopt.compress.select import ModuleRef, Parts, SelectionSpec
from vlmopt.compress.step import StepInputs, StepResult
from vlmopt.compress.svd import SVDConfig, apply_svd, restore_structure
from vlmopt.compress.uniform import UniformConfig, apply_uniform

__all__ = ["METHODS", "RUNTIME_METHODS", "Handler", "Method"]

#: ``handler(model, refs, config, inputs) -> (details, summary)`` (:mod:`vlmopt.compress.step`).
Handler = Callable[[nn.Module, list[ModuleRef], Any, StepInputs], StepResult]


def _always(step: Mapping[str, Any]) -> bool:
    """``plain_loadable`` of a method whose result is ordinary weights of the config's architecture."""
    return True


def _never(step: Mapping[str, Any]) -> bool:
    """``plain_loadable`` of a method whose result plain ``from_pretrained`` never rebuilds."""
    return False


@dataclass(frozen=True)
class Method:
    """A compression method: its settings, what it does, and how its result is held."""

    config: type[SelectionSpec]
    handler: Handler
    #: Nominal bits per weight element after the step.
    bits: Callable[[Any], int]
    #: True when weights stay floats that only imitate the quantized values (fake quantization).
    simulated: bool
    #: True when the result cannot be saved as ordinary weights and is re-applied at load time.
    runtime: bool
    #: Library versions that determine the result, recorded in the manifest.
    backend: Callable[[], dict[str, str]] = dict
    #: True when the step changes the structure (parameter count); the handler's step summary is
    #: recorded with the parameter counts before and after.
    structural: bool = False
    #: True when the handler needs calibration data (``inputs.calibration``).
    calibrated: bool = False
    #: True when the handler trains on a dataset split (``inputs.training``).
    trained: bool = False
    #: True when what later steps select depends on modules the step builds (a factorization,
    #: narrowed attention): planning (:mod:`vlmopt.compress.plan`) checks no step after it.
    opaque: bool = False
    # How a saved folder of the method is loaded back (vlmopt.compress.saved):
    #: ``(model, parts, manifest, folder)``: rebuilds on the loaded model what the saved tensors
    #: cannot say by themselves (a factorization, narrower attention, adapters, runtime kernels).
    restore: Callable[[nn.Module, Parts, Mapping[str, Any], Path], Any] | None = None
    #: When restore hooks run: 0 pruned heads, 1 factorized layers, 2 adapters, (3: runtime methods,
    #: re-applied from the manifest's ``runtime_steps``), 4 wrappers around the modules that finally
    #: run (activation quantizers).
    restore_stage: int = 0
    #: ``(folder, dtype=)``: builds the model when ``from_pretrained`` cannot (a changed architecture).
    load: Callable[..., Any] | None = None
    #: ``(manifest)``: the dtype the model must be loaded in, or None.
    load_dtype: Callable[[Mapping[str, Any]], str | None] | None = None
    #: True when the saved folder lacks some of the dense architecture's weights by design.
    partial_weights: bool = False
    #: ``(model, folder)``: writes what ``save_pretrained`` cannot store and removes it from the model.
    save: Callable[[nn.Module, Path], Any] | None = None
    #: ``(step)``: whether plain transformers ``from_pretrained`` on a saved folder rebuilds what this
    #: manifest step left (ordinary weights of the config's architecture). Where it does not (a
    #: factorization, narrower attention, input quantizers, runtime kernels, kept adapters), the saved
    #: folder is marked so that plain ``from_pretrained`` fails and names the loader instead of
    #: silently building the dense model (:func:`vlmopt.compress.saved.plain_load_blockers`).
    plain_loadable: Callable[[Mapping[str, Any]], bool] = _always


METHODS: dict[str, Method] = {
    "uniform": Method(
        UniformConfig,
        apply_uniform,
        bits=lambda c: c.bits,
        simulated=True,
        runtime=False,
        # Last, so that the input quantizers sit on the modules that finally run (int8 ones included).
        restore=lambda model, parts, manifest, folder: restore_activation_quant(model, manifest),
        restore_stage=4,
        # Weight-only quantization leaves float weights; input quantizers are hooks, not weights.
        plain_loadable=lambda step: step["settings"].get("activation_bits") is None,
    ),
    "dynamic_int8": Method(
        DynamicInt8Config,
        apply_dynamic_int8,
        bits=lambda c: 8,
        simulated=False,
        runtime=True,
        backend=lambda: {"torchao": torchao_version()},
        # The folder holds the float weights the int8 kernels start from.
        plain_loadable=_never,
    ),
    # Not quantization: weights keep their dtype (the handlers record each module's dtype width).
    "svd": Method(
        SVDConfig,
        apply_svd,
        bits=lambda c: 32,
        simulated=False,
        runtime=False,
        structural=True,
        opaque=True,
        restore=lambda model, parts, manifest, folder: restore_structure(model, manifest, folder),
        restore_stage=1,
        partial_weights=True,
        plain_loadable=_never,
    ),
    # The saved config already has the kept layers: from_pretrained builds the pruned model.
    "prune_layers": Method(
        PruneLayersConfig, apply_prune_layers, bits=lambda c: 32, simulated=False, runtime=False, structural=True
    ),
    "prune_heads": Method(
        PruneHeadsConfig,
        apply_prune_heads,
        bits=lambda c: 32,
        simulated=False,
        runtime=False,
        structural=True,
        opaque=True,
        # Pruned attention is narrower than the config says: built dense, shrunk, then loaded.
        load=load_head_pruned,
        restore=lambda model, parts, manifest, folder: restore_pruned_heads(model, manifest, folder),
        restore_stage=0,
        partial_weights=True,
        plain_loadable=_never,
    ),
    "gptq": Method(GPTQConfig, apply_gptq, bits=lambda c: c.bits, simulated=True, runtime=False, calibrated=True),
    "awq": Method(AWQConfig, apply_awq, bits=lambda c: c.bits, simulated=True, runtime=False, calibrated=True),
    # Structural in the accounting sense: every parameter's width changes, not only the selected Linears'.
    "precision": Method(
        PrecisionConfig,
        apply_precision,
        bits=lambda c: 16,
        simulated=False,
        runtime=False,
        structural=True,
        load_dtype=precision_dtype,
    ),
    # Structural in the accounting: kept (unmerged) adapters add parameters.
    "lora": Method(
        LoRAConfig,
        apply_lora,
        bits=lambda c: 32,
        simulated=False,
        runtime=False,
        structural=True,
        trained=True,
        backend=lambda: {"peft": _peft_version()},
        # Kept adapters go to their own files; the folder's model is the base model.
        save=lambda model, folder: save_adapters(model, folder),
        restore=lambda model, parts, manifest, folder: restore_adapters(model, manifest, folder),
        restore_stage=2,
        # Merged adapters are ordinary weights; kept ones are in files transformers does not read.
        plain_loadable=lambda step: step["settings"].get("merge", True),
    ),
}

#: Names of the methods whose result is re-applied at load time instead of saved.
RUNTIME_METHODS = frozenset(name for name, method in METHODS.items() if method.runtime)


def _peft_version() -> str:
    from vlmopt.compress.lora import _peft

    return str(_peft().__version__)
