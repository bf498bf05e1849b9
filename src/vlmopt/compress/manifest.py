"""What a variant changed, in numbers: parameter accounting, nominal size, and the manifest file.

Parameters are counted once each (tied parameters once) and assigned to the part whose listed
layer contains them; everything outside the listed layers (embeddings, heads, projections,
final norms) is ``other``. The nominal size counts every parameter at its dtype's width except
quantized weights, which count at their bit width (when several steps quantize the same weight,
the smallest width counts: that is the information the weight still holds). Scales and zero
points are not counted, matching the "elements x bits" convention of the studies this project
replaces; the serialized size, measured by the caller, is the honest on-disk number.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmopt.compress.select import OTHER, PARTS, Parts

__all__ = [
    "ParamInfo",
    "build_manifest",
    "param_inventory",
    "serialized_size",
    "write_manifest",
]

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ParamInfo:
    """One parameter: where it lives and how many bits its elements take now."""

    numel: int
    dtype_bits: int
    part: str


def _part_by_prefix(parts: Parts) -> dict[str, str]:
    return {name: part for part, layers in parts.items() for name, _ in layers}


def _owner_part(name: str, prefixes: dict[str, str]) -> str:
    pieces = name.split(".")
    for end in range(len(pieces) - 1, 0, -1):
        part = prefixes.get(".".join(pieces[:end]))
        if part is not None:
            return part
    return OTHER


def param_inventory(model: nn.Module, parts: Parts) -> dict[str, ParamInfo]:
    """Every distinct parameter of ``model`` by (first) name, with its size, width and part."""
    prefixes = _part_by_prefix(parts)
    return {
        name: ParamInfo(numel=p.numel(), dtype_bits=p.dtype.itemsize * 8, part=_owner_part(name, prefixes))
        for name, p in model.named_parameters()
    }


def _merge_modules(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for step in steps:
        for record in step["modules"]:
            entry = merged.get(record["name"])
            if entry is None:
                keys = ("name", "part", "layer_index", "position", "role", "attention_kind", "bits")
                merged[record["name"]] = {**{k: record[k] for k in keys}, "methods": [step["method"]]}
            else:
                entry["bits"] = min(entry["bits"], record["bits"])
                entry["methods"].append(step["method"])
    return list(merged.values())


def build_manifest(
    inventory: dict[str, ParamInfo],
    parts: Parts,
    steps: list[dict[str, Any]],
    runtime_steps: list[dict[str, Any]],
) -> dict[str, Any]:
    """The manifest dict (JSON-ready) for ``steps`` already applied to a model of ``inventory``."""
    changed = _merge_modules(steps)
    bits_of = {f"{m['name']}.weight": m["bits"] for m in changed}
    unknown = [name for name in bits_of if name not in inventory]
    if unknown:
        raise ValueError(f"changed weights {unknown} are not parameters of the model (inventory taken before)")

    groups = [p for p in PARTS if parts.get(p)] + [OTHER]
    counts = {g: {"total": 0, "changed": 0, "bits": 0, "dense_bits": 0} for g in [*groups, "model"]}
    for name, info in inventory.items():
        bits = bits_of.get(name, info.dtype_bits)
        for g in (info.part, "model"):
            c = counts[g]
            c["total"] += info.numel
            c["changed"] += info.numel if name in bits_of else 0
            c["bits"] += info.numel * bits
            c["dense_bits"] += info.numel * info.dtype_bits

    parameters = {
        g: {
            "total": c["total"],
            "changed": c["changed"],
            "fraction_changed": c["changed"] / c["total"] if c["total"] else 0.0,
            "nominal_bits_per_parameter": c["bits"] / c["total"] if c["total"] else 0.0,
        }
        for g, c in counts.items()
    }
    model_counts = counts["model"]
    nominal = math.ceil(model_counts["bits"] / 8)
    dense = math.ceil(model_counts["dense_bits"] / 8)
    simulated = [s["simulated"] for s in steps]
    if not steps:
        representation = "baseline"
    elif all(simulated):
        representation = "simulated"
    elif not any(simulated):
        representation = "real"
    else:
        representation = "mixed"

    return {
        "manifest_version": MANIFEST_VERSION,
        "methods": [s["method"] for s in steps],
        "steps": steps,
        "changed_modules": changed,
        "n_changed_modules": len(changed),
        "parameters": parameters,
        "fraction_changed": {g: p["fraction_changed"] for g, p in parameters.items()},
        "nominal_bits_per_parameter": parameters["model"]["nominal_bits_per_parameter"],
        "nominal_size_bytes": nominal,
        "dense_size_bytes": dense,
        "nominal_compression_ratio": dense / nominal if nominal else 1.0,
        "simulated": any(simulated),
        "representation": representation,
        "runtime_steps": runtime_steps,
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    from vlmopt import __version__

    return {"vlmopt": __version__, "torch": torch.__version__}


def serialized_size(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the real storage cost of the weights as held."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def write_manifest(
    path: str | os.PathLike[str],
    manifest: dict[str, Any],
    *,
    serialized_size_bytes: int,
    inputs_hash: str,
) -> Path:
    """Write ``manifest`` plus the measured size and input hash as JSON, atomically.

    The file appears complete or not at all (temporary file in the same folder, then rename), so
    a killed job never leaves a manifest a rerun would trust.
    """
    path = Path(path)
    full = {**manifest, "serialized_size_bytes": int(serialized_size_bytes), "inputs_hash": str(inputs_hash)}
    text = json.dumps(full, indent=2, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
