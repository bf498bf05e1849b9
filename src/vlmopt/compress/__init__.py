"""Compression methods, the module selector they share, and the manifest of what they changed.

Entry points: :func:`compress` applies a list of step dicts to a loaded model and returns its
:class:`Manifest`; :func:`apply_variant` runs a list of step dicts on a model described by its
``parts`` and returns the manifest; :func:`save_variant` writes the compressed folder with its
manifest and :func:`load_variant` loads one back as it was evaluated, each method restoring its
own structure (:mod:`vlmopt.compress.saved`). The methods are listed in :data:`METHODS`
(:mod:`vlmopt.compress.methods`), each handler called as :mod:`vlmopt.compress.step` describes.
"""

from __future__ import annotations

from vlmopt.compress.activations import ActivationQuantizer, restore_activation_quant
from vlmopt.compress.api import Manifest, compress
from vlmopt.compress.awq import AWQConfig, AWQResult, awq_quantize, awq_quantize_weight
from vlmopt.compress.calibration import Calibration
from vlmopt.compress.dynamic_int8 import DynamicInt8Config
from vlmopt.compress.gptq import (
    GPTQCholeskyError,
    GPTQConfig,
    GPTQResult,
    HessianAccumulator,
    gptq_quantize,
    gptq_quantize_weight,
)
from vlmopt.compress.lora import LoRAConfig, TrainingData, restore_adapters, save_adapters
from vlmopt.compress.manifest import serialized_size, write_manifest
from vlmopt.compress.methods import METHODS, RUNTIME_METHODS, Method
from vlmopt.compress.precision import PrecisionConfig
from vlmopt.compress.prune_heads import PruneHeadsConfig
from vlmopt.compress.prune_heads_saved import load_head_pruned, restore_pruned_heads
from vlmopt.compress.prune_layers import PruneLayersConfig, refresh_parts
from vlmopt.compress.quant import (
    QuantSpec,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
    rtn_quantize_weight,
    weight_quant_spec,
)
from vlmopt.compress.saved import load_variant, save_variant
from vlmopt.compress.select import (
    PARTS,
    ModuleRef,
    NothingSelectedError,
    SelectionSpec,
    attention_kind_of,
    role_of,
    select_modules,
)
from vlmopt.compress.step import StepInputs
from vlmopt.compress.svd import LowRankLinear, SVDConfig, rank_from_ratio, restore_structure
from vlmopt.compress.uniform import UniformConfig
from vlmopt.compress.variant import (
    apply_runtime_steps,
    apply_variant,
    parse_step,
    step_datasets,
    step_tasks,
)

__all__ = [
    "METHODS",
    "PARTS",
    "RUNTIME_METHODS",
    "ActivationQuantizer",
    "AWQConfig",
    "AWQResult",
    "Calibration",
    "DynamicInt8Config",
    "GPTQCholeskyError",
    "GPTQConfig",
    "GPTQResult",
    "HessianAccumulator",
    "LoRAConfig",
    "StepInputs",
    "LowRankLinear",
    "Manifest",
    "Method",
    "ModuleRef",
    "NothingSelectedError",
    "PrecisionConfig",
    "PruneHeadsConfig",
    "PruneLayersConfig",
    "QuantSpec",
    "SelectionSpec",
    "SVDConfig",
    "TrainingData",
    "UniformConfig",
    "apply_runtime_steps",
    "apply_variant",
    "load_variant",
    "save_variant",
    "attention_kind_of",
    "awq_quantize",
    "awq_quantize_weight",
    "choose_qparams",
    "compress",
    "dequantize",
    "fake_quantize",
    "gptq_quantize",
    "gptq_quantize_weight",
    "load_head_pruned",
    "parse_step",
    "quantize",
    "rank_from_ratio",
    "refresh_parts",
    "restore_activation_quant",
    "restore_adapters",
    "restore_pruned_heads",
    "restore_structure",
    "role_of",
    "rtn_quantize_weight",
    "save_adapters",
    "select_modules",
    "serialized_size",
    "step_datasets",
    "step_tasks",
    "weight_quant_spec",
    "write_manifest",
]
