"""A compressed model folder: saving a variant with its manifest, and loading it back as it was evaluated.

The folder holds what ``save_pretrained`` can store (the model's tensors after the steps, its
processor, ``vlmopt.json``), whatever a method stores beside it (kept LoRA adapters), and
``manifest.json``. What the saved tensors cannot say by themselves, each method restores through
the hooks of its :class:`~vlmopt.compress.variant.Method` entry:

- ``load_dtype``: the dtype the dense model is built in (a ``precision`` step's float16);
- ``load``: how the model is built when ``from_pretrained`` cannot build it (pruned attention
  heads make layers narrower than the config says);
- ``partial_weights``: the folder lacks some of the dense architecture's weights by design
  (factorized or pruned layers), so the loader's warning about them is silenced;
- ``save``: writes the method's own files and removes what ``save_pretrained`` must not see;
- ``restore``: rebuilds the method's structure on the loaded model, in the order of
  ``restore_stage`` (structure, then adapters, then wrappers around the modules that finally
  run); runtime methods (dynamic int8) are re-applied from the manifest's ``runtime_steps``
  between adapters and wrappers;
- ``plain_loadable``: whether plain transformers ``from_pretrained`` rebuilds what a step left.

A folder that plain transformers would load wrongly (factorized layers, pruned heads, input
quantizers, dynamic int8, kept adapters) must not load there at all: transformers would build the
dense architecture, initialize the weights it lacks at random and only warn. So its
``config.json`` carries :data:`PLAIN_LOAD_KEY`, the config field through which transformers reads
a checkpoint's weights from an explicitly named file. Before it builds anything,
``from_pretrained`` (of a model class and of the ``Auto`` classes alike: ``modeling_utils``'s
``_get_resolved_checkpoint_files``) rejects a name that is not a safetensors file and quotes it,
so the value is the message the user reads::

    ValueError: The transformers file in the config seems to be incorrect: it is neither a
    safetensors file (*.safetensors) nor a safetensors index file (*.safetensors.index.json):
    this folder is a vlmopt compressed variant (svd) that plain from_pretrained cannot rebuild;
    load it with vlmopt.compress.saved.load_variant(folder)

:func:`load_variant` has the loaders override the key (``from_pretrained``'s config overrides), so
it reads the folder as saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "PLAIN_LOAD_KEY",
    "NotExportable",
    "export_variant",
    "folder_digest",
    "load_variant",
    "plain_load_blockers",
    "read_manifest",
    "save_variant",
]

#: The ``config.json`` field that makes plain transformers ``from_pretrained`` refuse a folder it
#: would load wrongly: transformers reads the weights from the file it names and rejects, quoting
#: it, a name that is not a safetensors file (so the value below is what the user reads).
PLAIN_LOAD_KEY = "transformers_weights"
_MARKER_START = "this folder is a vlmopt compressed variant"


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The ``manifest.json`` of a compressed folder, or None for a plain model folder."""
    path = Path(folder) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def folder_digest(folder: str | Path) -> str:
    """Hash of a saved model's weights and config files (what a variant was computed from)."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).glob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".json"):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _methods(manifest: Mapping[str, Any] | None) -> list[Any]:
    """The :class:`Method` entries of the manifest's steps, each once, in step order."""
    from vlmopt.compress.methods import METHODS

    names = dict.fromkeys(step.get("method") for step in (manifest or {}).get("steps", []))
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"the manifest records unknown compression method(s) {unknown}; methods: {', '.join(METHODS)}")
    return [METHODS[name] for name in names]


def _run_hooks(hooks: list[Callable[..., Any]], *args: Any) -> None:
    """Each distinct hook once, in order (several methods may share one, such as activation quantizers)."""
    done: list[Callable[..., Any]] = []
    for hook in hooks:
        if hook not in done:
            hook(*args)
            done.append(hook)


def plain_load_blockers(manifest: Mapping[str, Any] | None) -> list[str]:
    """The methods of the manifest's steps that plain ``from_pretrained`` cannot rebuild, each once, in step order.

    Empty when the saved folder holds ordinary weights of its config's architecture (weight-only
    quantization, pruned layers, a precision change, merged adapters), which plain transformers
    loads as :func:`load_variant` does.
    """
    from vlmopt.compress.methods import METHODS

    _methods(manifest)  # unknown methods are an error here too
    names = [
        step["method"] for step in (manifest or {}).get("steps", []) if not METHODS[step["method"]].plain_loadable(step)
    ]
    return list(dict.fromkeys(names))


def _plain_load_marker(blockers: list[str]) -> str:
    """The :data:`PLAIN_LOAD_KEY` value of a folder whose ``blockers`` plain transformers cannot rebuild."""
    return (
        f"{_MARKER_START} ({', '.join(blockers)}) that plain from_pretrained cannot rebuild; "
        "load it with vlmopt.compress.saved.load_variant(folder)"
    )


def _is_marker(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(_MARKER_START)


def _edit_config(folder: Path, values: Mapping[str, Any]) -> None:
    """Set ``values`` in ``folder/config.json``, written as transformers writes it."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _mark_config(folder: Path, blockers: list[str]) -> None:
    """Add the :data:`PLAIN_LOAD_KEY` marker to ``folder/config.json``."""
    _edit_config(folder, {PLAIN_LOAD_KEY: _plain_load_marker(blockers)})


def _weight_bytes(folder: Path) -> int:
    """Bytes of the folder's safetensors files (the model's weights as stored)."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _plain_load_overrides(folder: Path, manifest: Mapping[str, Any] | None) -> dict[str, Any]:
    """Config values the loaders must override: none for a folder plain transformers may read, and
    the :data:`PLAIN_LOAD_KEY` marker cleared for a marked one (the folder itself stays as saved)."""
    path = folder / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if not _is_marker(config.get(PLAIN_LOAD_KEY)):
        return {}
    if manifest is None:
        raise ValueError(
            f"{folder}: config.json marks a vlmopt compressed variant, but the folder holds no manifest.json, "
            "which says how to rebuild it"
        )
    return {PLAIN_LOAD_KEY: None}


#: Where the runtime steps are re-applied among the restore hooks' stages.
RUNTIME_STAGE = 3


def _reapply_runtime_steps(model: Any, parts: Any, manifest: Mapping[str, Any], folder: Path) -> None:
    from vlmopt.compress.variant import apply_runtime_steps

    apply_runtime_steps(model, parts, manifest)


def restore_methods(loaded: Any, manifest: Mapping[str, Any], folder: str | Path, *, only: Any = None) -> None:
    """Run the ``restore`` hooks of the manifest's methods (those ``only`` accepts, if given) on ``loaded``,
    in stage order; the runtime methods' steps are re-applied from the manifest at :data:`RUNTIME_STAGE`."""
    hooks = []
    for method in _methods(manifest):
        if only is not None and not only(method):
            continue
        if method.runtime:
            hooks.append((RUNTIME_STAGE, _reapply_runtime_steps))
        elif method.restore is not None:
            hooks.append((method.restore_stage, method.restore))
    hooks.sort(key=lambda item: item[0])
    _run_hooks([hook for _, hook in hooks], loaded.model, loaded.parts(), manifest, Path(folder))


def save_variant(
    loaded: Any,
    out_dir: str | Path,
    manifest: dict[str, Any],
    *,
    inputs_hash: str,
    share: str | Path | None = None,
) -> Path:
    """Save a model that :func:`~vlmopt.compress.variant.apply_variant` changed (``defer_runtime=True``)
    to ``out_dir`` with its ``manifest.json`` (plus the serialized size, ``inputs_hash`` and
    ``storage``: how the weights are stored, :meth:`vlmopt.compress.packed.PackPlan.summary`, and
    the bytes of the safetensors files); returns the manifest's path. Quantized Linears whose
    weights lie on their recorded grid are written packed (:mod:`vlmopt.compress.packed`).

    The model is moved to the CPU, where runtime steps (dynamic int8) run. Methods with a ``save``
    hook write their own files first (kept LoRA adapters), the model is saved, and then the
    ``restore`` hooks of those methods and of the runtime methods run, so that on return ``loaded``
    is the model as :func:`load_variant` reads it back. When a step's method is not
    ``plain_loadable``, ``config.json`` gets the :data:`PLAIN_LOAD_KEY` marker, so that plain
    transformers refuses the folder and names :func:`load_variant`.

    With ``share`` (a store folder), the weights are written one file per module group and each
    file already in the store is a hard link to it (:func:`vlmopt.compress.sharing.share_weights`):
    what a variant leaves unchanged is on disk once for all the variants of a base model.
    """
    from vlmopt.compress.manifest import serialized_size, write_manifest
    from vlmopt.compress.methods import METHODS
    from vlmopt.compress.packed import pack_plan, packed_state_dict, quantization_config

    out_dir = Path(out_dir)
    loaded.model.to("cpu")
    methods = _methods(manifest)
    _run_hooks([m.save for m in methods if m.save is not None], loaded.model, out_dir)
    # Layers that vlmopt rebuilds from the saved float tensors (factorized, narrowed) stay float.
    rebuilt = [step["method"] for step in manifest.get("steps", []) if METHODS[step["method"]].partial_weights]
    refuse = None
    if rebuilt:
        refuse = f"its {', '.join(dict.fromkeys(rebuilt))} step(s) leave layers that vlmopt rebuilds from float tensors"
    plan = pack_plan(loaded.model, refuse=refuse)
    loaded.save(out_dir, state_dict=packed_state_dict(loaded.model, plan) if plan.packed else None)
    if plan.packed:
        _edit_config(out_dir, {"quantization_config": quantization_config(plan)})
    storage = {**plan.summary(), "weight_bytes": _weight_bytes(out_dir)}
    if share is not None:
        from vlmopt.compress.sharing import share_weights

        storage["weight_files"] = share_weights(out_dir, share)["files"]
    if plan.reason and plan.kept:
        log.warning("the variant is stored with float weights: %s", plan.reason)
    elif plan.kept:
        by_reason: dict[str, list[str]] = {}
        for name, why in plan.kept.items():
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            log.warning("%d quantized module(s) keep float weights (%s): %s", len(names), names[0], why)
    blockers = plain_load_blockers(manifest)
    if blockers:
        _mark_config(out_dir, blockers)
    restore_methods(loaded, manifest, out_dir, only=lambda m: m.save is not None or m.runtime)
    return write_manifest(
        out_dir / "manifest.json",
        {**manifest, "storage": storage},
        serialized_size_bytes=serialized_size(loaded.model),
        inputs_hash=inputs_hash,
    )


def load_variant(model_dir: str | Path, *, dtype: str | None = None) -> Any:
    """Load a compressed model folder as it was evaluated, from its manifest.

    ``from_pretrained`` builds the original dense architecture (in the dtype a method's
    ``load_dtype`` asks for, unless ``dtype`` is given), or a method's ``load`` hook builds it,
    with the :data:`PLAIN_LOAD_KEY` marker of the folder's config overridden; then the methods'
    ``restore`` hooks run in stage order (see the module docstring). A folder without a manifest
    is loaded as a plain model.
    """
    from transformers.utils import logging as hf_logging

    from vlmopt.models import load_model

    manifest = read_manifest(model_dir)
    methods = _methods(manifest)
    if dtype is None:
        # Not every config class restores a float16 checkpoint as float16 by itself.
        dtypes = [m.load_dtype(manifest) for m in methods if m.load_dtype is not None]
        dtype = next((d for d in reversed(dtypes) if d is not None), None)
    loaders = [m.load for m in methods if m.load is not None]
    if len(set(loaders)) > 1:
        raise ValueError(f"{model_dir}: more than one method of the manifest builds the model itself")
    level = hf_logging.get_verbosity()
    if any(m.partial_weights for m in methods):
        # The dense weights of factorized or pruned layers are missing by design; the restore hooks load them.
        hf_logging.set_verbosity_error()
    overrides = _plain_load_overrides(Path(model_dir).expanduser(), manifest)
    try:
        if loaders:
            loaded = loaders[0](model_dir, dtype=dtype, config_overrides=overrides)
        else:
            loaded = load_model(model_dir, dtype=dtype, config_overrides=overrides)
    finally:
        hf_logging.set_verbosity(level)
    decompress_packed(loaded.model)
    if manifest is not None:
        restore_methods(loaded, manifest, model_dir)
    return loaded


#: What compressed-tensors leaves on a module it decompressed: parameters and attributes.
_CT_PARAMETERS = ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "weight_packed")
_CT_ATTRIBUTES = ("quantization_scheme", "quantization_status", "forward", "_original_forward_func", "is_staged")


def decompress_packed(model: Any) -> int:
    """Turn the modules that transformers keeps compressed (a packed folder of several schemes, loaded
    without ``dequantize``) into plain Linears with their float weights, as the variant was evaluated;
    returns how many. A model loaded with ``dequantize`` (one scheme) or without packed modules is left
    as it is.
    """
    kept = [m for m in model.modules() if hasattr(m, "quantization_scheme")]
    if not kept:
        return 0
    quantizer = getattr(model, "hf_quantizer", None)
    compressor = getattr(quantizer, "compressor", None)
    if compressor is None:
        raise ValueError("the model holds compressed-tensors modules but no compressor to decompress them")
    from compressed_tensors.quantization import QuantizationStatus

    if any(getattr(m, "quantization_status", None) == QuantizationStatus.COMPRESSED for m in kept):
        compressor.decompress_model(model)
    for module in kept:
        for name in _CT_PARAMETERS:
            if name in module._parameters:
                del module._parameters[name]
            if name in module._buffers:
                del module._buffers[name]
        for name in _CT_ATTRIBUTES:
            module.__dict__.pop(name, None)
    return len(kept)


class NotExportable(ValueError):
    """A variant folder that cannot be handed to a serving stack as packed low-bit weights."""


#: Files of a variant folder that only vlmopt reads; an export leaves them out.
_VLMOPT_FILES = ("manifest.json", "vlmopt.json")


def export_variant(folder: str | Path, out: str | Path) -> Path:
    """Write the packed low-bit model of the variant in ``folder`` to ``out``: its config (with the
    compressed-tensors ``quantization_config``), weights and processor files, which transformers
    (with compressed-tensors) and vLLM load without vlmopt. Files are hard-linked where the file
    system allows, else copied; ``out`` must not exist yet.

    :class:`NotExportable` names why a variant has no such folder: nothing stored packed (the
    manifest's ``storage`` reason), quantized modules kept as floats, or steps that plain
    transformers cannot rebuild (:func:`plain_load_blockers`).
    """
    import os
    import shutil

    folder, out = Path(folder), Path(out)
    manifest = read_manifest(folder)
    if manifest is None:
        raise NotExportable(f"{folder} holds no manifest.json: it is not a vlmopt variant folder")
    storage = manifest.get("storage") or {}
    if storage.get("format") != "pack-quantized":
        why = storage.get("reason") or "no module was stored packed"
        if storage.get("kept_float"):
            name, first = next(iter(storage["kept_float"].items()))
            why += f" (e.g. {name}: {first})"
        if "storage" not in manifest:
            why = "it was saved before variants were stored packed; compress it again"
        raise NotExportable(f"{folder} is not stored as packed low-bit weights: {why}")
    if storage.get("kept_float"):
        name, why = next(iter(storage["kept_float"].items()))
        raise NotExportable(
            f"{folder}: {len(storage['kept_float'])} quantized module(s) are stored as floats (e.g. {name}: {why}), "
            "so the folder would not serve as the variant that was evaluated"
        )
    blockers = plain_load_blockers(manifest)
    if blockers:
        raise NotExportable(
            f"{folder}: its {', '.join(blockers)} step(s) leave what plain transformers cannot rebuild; "
            "load it with vlmopt.compress.saved.load_variant"
        )
    if out.exists():
        raise FileExistsError(f"{out} exists; give a new folder to export to")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for entry in sorted(folder.iterdir()):
        if entry.name in _VLMOPT_FILES or not entry.is_file():
            continue
        try:
            os.link(entry, partial / entry.name)
        except OSError:
            shutil.copy2(entry, partial / entry.name)
    os.replace(partial, out)
    return out
