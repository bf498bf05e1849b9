"""Compression methods, the module selector they share, and the manifest of what they changed.

Entry points: :func:`apply_variant` runs a list of step dicts on a model described by its
``parts`` and returns the manifest; :func:`apply_runtime_steps` re-applies runtime steps (such
as ``dynamic_int8``) after a compressed model folder is loaded; :func:`write_manifest` and
:func:`serialized_size` finish the compressed folder.
"""

from __future__ import annotations

from vlmopt.compress.dynamic_int8 import DynamicInt8Config
from vlmopt.compress.manifest import serialized_size, write_manifest
from vlmopt.compress.quant import QuantSpec, choose_qparams, dequantize, fake_quantize, quantize
from vlmopt.compress.select import (
    PARTS,
    ModuleRef,
    NothingSelectedError,
    SelectionSpec,
    attention_kind_of,
    role_of,
    select_modules,
)
from vlmopt.compress.uniform import UniformConfig
from vlmopt.compress.variant import (
    METHODS,
    RUNTIME_METHODS,
    Method,
    apply_runtime_steps,
    apply_variant,
    parse_step,
)

__all__ = [
    "METHODS",
    "PARTS",
    "RUNTIME_METHODS",
    "DynamicInt8Config",
    "Method",
    "ModuleRef",
    "NothingSelectedError",
    "QuantSpec",
    "SelectionSpec",
    "UniformConfig",
    "apply_runtime_steps",
    "apply_variant",
    "attention_kind_of",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "parse_step",
    "quantize",
    "role_of",
    "select_modules",
    "serialized_size",
    "write_manifest",
]
