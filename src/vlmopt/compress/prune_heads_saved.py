"""Reading back a compressed folder whose attention heads were pruned.

``from_pretrained`` builds full-size attention from the config and refuses the smaller saved
tensors, so a compressed folder is read back with :func:`load_head_pruned` (which lets those
tensors through as freshly initialized placeholders) followed by :func:`restore_pruned_heads`
(names and shapes from the manifest, weights from the folder's safetensors), before
:func:`~vlmopt.compress.svd.restore_structure` when an ``svd`` step later factorized the
pruned projections. :func:`head_pruned_modules` lists, from the manifest, the projections that
``prune_heads`` steps shrank (see :mod:`vlmopt.compress.prune_heads`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmopt.compress.attention_layouts import _LAYOUT_BY_NAME, METHOD, AttentionLayout, _set_heads, layout_of
from vlmopt.compress.prune_heads import _empty_linear
from vlmopt.compress.prune_layers import final_name
from vlmopt.compress.sharing import weight_files
from vlmopt.compress.svd import saved_key_names, svd_modules

__all__ = ["head_pruned_modules", "load_head_pruned", "restore_pruned_heads"]

log = logging.getLogger(__name__)


def head_pruned_modules(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The projections that ``prune_heads`` steps shrank, as they are at the end, under their final names.

    One record per module (the last step that shrank it wins): ``name``, ``block``, ``layout``,
    ``heads`` (the block's query-head count), ``out_features``, ``in_features``, ``bias``, and for
    blocks reading a shared position bias ``bias_heads`` and ``bias_width``. A module in a layer
    that a later ``prune_layers`` step renumbered gets its new name; one in a dropped layer is left
    out.
    """
    steps = list(manifest.get("steps", []))
    records: dict[str, dict[str, Any]] = {}
    for index, step in enumerate(steps):
        if step.get("method") != METHOD or not step.get("applied", True):
            continue
        for module in step["modules"]:
            name = final_name(module["name"], steps[index + 1 :])
            block = final_name(module["block"], steps[index + 1 :])
            if name is None or block is None:
                continue
            records[name] = {
                "name": name,
                "block": block,
                "layout": module["layout"],
                "heads": module["heads_after"],
                "out_features": module["out_features_after"],
                "in_features": module["in_features_after"],
                "bias": module["bias"],
                **{key: module[key] for key in ("bias_heads", "bias_width") if key in module},
            }
    return list(records.values())


def _read_saved(folder: Path, keys: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """The saved tensors named ``keys``, and the shape of every saved tensor."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(folder, "cannot restore the pruned heads"):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
                if key in keys:
                    tensors[key] = handle.get_tensor(key)
    return tensors, shapes


def load_head_pruned(
    folder: str | os.PathLike[str], *, dtype: str | None = None, config_overrides: Mapping[str, Any] | None = None
) -> Any:
    """Read a compressed folder whose attention heads were pruned, ready for :func:`restore_pruned_heads`.

    Like :func:`vlmopt.models.load_model` on a folder, except that the saved projections smaller
    than the config's full-size attention are let through (``ignore_mismatched_sizes``) as freshly
    initialized placeholders; :func:`restore_pruned_heads` then replaces them and checks that every
    saved tensor matches the model, so no other mismatch goes unnoticed. ``config_overrides`` as
    for :func:`~vlmopt.models.load_model`.
    """
    from transformers import AutoConfig

    from vlmopt.models import DTYPES, family_of_config, get_family

    source = str(folder)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    marker = Path(source) / "vlmopt.json"
    if marker.is_file():
        family = get_family(json.loads(marker.read_text())["family"])
    else:
        family = get_family(family_of_config(AutoConfig.from_pretrained(source)))
    kwargs: dict[str, Any] = {**(config_overrides or {}), "ignore_mismatched_sizes": True}
    if dtype is not None:
        kwargs["dtype"] = DTYPES[dtype]
    loaded = family.from_pretrained(source, **kwargs)
    loaded.source = source
    return loaded


@torch.no_grad()
def restore_pruned_heads(model: nn.Module, manifest: Mapping[str, Any], folder: str | os.PathLike[str]) -> list[str]:
    """Shrink the attention blocks the manifest records as head-pruned and load their weights; the module names.

    ``model`` comes from :func:`load_head_pruned` on ``folder``: its pruned projections are back at
    full size. Each recorded projection becomes a Linear of the recorded shape (same dtype and
    device) holding the folder's tensors, and each block gets its recorded head count (and, where
    the layout needs it, its pruned forward). Projections that a later ``svd`` step factorized get
    an uninitialized Linear of the pruned shape for :func:`~vlmopt.compress.svd.restore_structure`
    to replace, so call that afterwards. Finally every tensor of the folder is checked against the
    model's shapes. Raises ``ValueError`` for a missing block, module or tensor, or a mismatch.
    """
    records = head_pruned_modules(manifest)
    if not records:
        return []
    folder = Path(folder)
    factorized = {r["name"] for r in svd_modules(manifest)}
    blocks: dict[str, tuple[AttentionLayout, dict[str, Any]]] = {}
    for record in records:
        layout = _LAYOUT_BY_NAME.get(record["layout"])
        if layout is None:
            raise ValueError(f"{METHOD}: the manifest names an unknown attention layout {record['layout']!r}")
        try:
            module = model.get_submodule(record["block"])
            current = model.get_submodule(record["name"])
        except AttributeError as err:
            raise ValueError(
                f"{METHOD}: the manifest pruned heads of {record['name']}, which the loaded model does not have"
            ) from err
        if layout_of(module) != layout:
            raise ValueError(
                f"{METHOD}: {record['block']} in the loaded model is not a {layout.name!r} attention block"
            )
        if not isinstance(current, nn.Linear):
            raise ValueError(
                f"{METHOD}: {record['name']} is a {type(current).__name__} in the loaded model, expected a Linear"
            )
        blocks[record["block"]] = (layout, record)

    # transformers 5 saves some models under older key names (see svd.saved_key_names).
    wanted = [
        f"{r['name']}.{key}"
        for r in records
        if r["name"] not in factorized
        for key in (("weight", "bias") if r["bias"] else ("weight",))
    ]
    saved = saved_key_names(model, wanted)
    tensors, shapes = _read_saved(folder, set(saved.values()))
    for record in records:
        name = record["name"]
        current = model.get_submodule(name)
        new = _empty_linear(record["in_features"], record["out_features"], record["bias"], like=current.weight)
        if name not in factorized:
            state = {key: tensors.get(saved[f"{name}.{key}"]) for key in new.state_dict()}
            missing = [f"{name}.{key}" for key, value in state.items() if value is None]
            if missing:
                raise ValueError(f"{METHOD}: {folder} lacks the tensors {missing} recorded in the manifest")
            wrong = {k: tuple(v.shape) for k, v in state.items() if v.shape != new.state_dict()[k].shape}
            if wrong:
                raise ValueError(
                    f"{METHOD}: {folder} holds {name} {wrong}, the manifest recorded "
                    f"{record['out_features']}x{record['in_features']}"
                )
            new.load_state_dict(state, strict=True)
        new.train(current.training)
        new.requires_grad_(current.weight.requires_grad)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    for block, (layout, record) in blocks.items():
        _set_heads(
            model.get_submodule(block),
            layout,
            record["heads"],
            bias_heads=record.get("bias_heads"),
            bias_width=record.get("bias_width"),
        )

    state = model.state_dict()
    model_shapes = {saved_as: tuple(state[k].shape) for k, saved_as in saved_key_names(model, list(state)).items()}
    mismatched = [f"{k}: saved {s}, model {model_shapes[k]}" for k, s in shapes.items() if model_shapes.get(k, s) != s]
    if mismatched:
        raise ValueError(
            f"{METHOD}: after restoring, {folder} still disagrees with the model: {mismatched[:4]}"
            f"{' ...' if len(mismatched) > 4 else ''}"
        )
    log.info("%s: restored %d blocks (%d projections) from %s", METHOD, len(blocks), len(records), folder)
    return [r["name"] for r in records]
