"""Layer pruning: remove whole transformer layers from one part of the model.

A ``prune_layers`` step drops the top ``drop_last`` layers of a part, keeps only its first
``keep`` layers, or drops the listed ``layers`` (indices into the part's layer list). This is the
structural pruning of the RSICD captioning study on BLIP-2 OPT-2.7b: "Q6" and "Q8" keep 6 and 8
of the Q-Former's 12 layers, "LLM28" keeps 28 of OPT's 32 decoder layers, followed there by LoRA
recovery (``{method: prune_layers, part: bridge, keep: 8}``).

The layer list shrinks in place and the sub-config that built it gets the new
``num_hidden_layers`` (BLIP: the vision encoder's or the text decoder's; BLIP-2: the vision
encoder's, the Q-Former's or OPT's), so ``save_pretrained`` + ``from_pretrained`` rebuild exactly
the pruned model. Remaining layers are renumbered (``layer_idx``, which indexes the KV cache).
The Q-Former places cross-attention in every ``cross_attention_frequency``-th layer, so a
selection after which the kept layers no longer follow that pattern is refused (it could not be
reloaded). Dropping every layer of a part, an index out of range, or a selection that drops
nothing are errors.

A part may span several layer lists: BLIP-2 Flan-T5's ``language`` part is the T5 encoder's
blocks followed by the decoder's. Indices then count over the part's list in the order of the
adapter's ``parts()``; the step splits them per list, deletes the blocks of each, and updates
each stack's count: ``num_layers`` (the encoder) and ``num_decoder_layers`` (the decoder) of the
T5 config, and the per-stack copy of that config each ``T5Stack`` keeps (it sizes the decoder's
KV cache). Every list keeps at least one layer. transformers 5 sizes T5's generation cache by the
encoder's block count, so a selection that leaves the decoder with more blocks than the encoder
is refused (the pruned model could not generate).

T5-style stacks (T5's encoder and decoder, Pix2Struct's text decoder) compute the relative
position bias in their first block only (``relative_attention_bias`` on its self-attention, with
``has_relative_attention_bias`` set) and hand it to the blocks above. When the first block is
dropped, its bias table moves to the new first block's self-attention, so the pruned model
computes what the dense model computes without that block, and the table is saved under the key
that ``from_pretrained`` builds for the first block. (Pix2Struct's vision encoder uses learned
row and column embeddings, not a relative bias; a stack whose blocks each own a table keeps them
as they are.)

Since the step removes layers rather than changing weights, its selection is the Linear modules
of the dropped layers (recorded in the manifest like any other step's modules); the step entry's
``structure`` lists the dropped layers (indices into the part's list), the parameter counts
before and after, and under ``layer_lists`` one entry per layer list of the part: its
``layer_list`` (module path), ``dropped_layers`` (indices into that list), layer counts,
``config_key`` (the saved config entry that holds its count) and, where a first block was dropped,
``moved_bias`` (the table's path inside a block, and the blocks it moved from and to, numbered as
before the step). A part in one list also has the flat ``layer_list`` and ``config_key`` of
manifests written before ``layer_lists`` existed; those older manifests still read.

Finding a part's layer lists and the configs that size them, and the checks and renumberings
above, are in :mod:`vlmopt.compress.layer_lists`.

Study: S3 of the project's seed studies (RSICD remote-sensing captioning, pruning + LoRA);
layer dropping in general: Fan et al., "Reducing Transformer Depth on Demand with Structured
Dropout", ICLR 2020, https://arxiv.org/abs/1909.11556.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from vlmopt.compress.layer_lists import (
    _BIAS_FLAG,
    _BIAS_TABLE,
    _bias_moves,
    _check_cross_attention,
    _check_generation,
    _layer_list,
    _renumbered_feature_layer,
    _renumbered_full_attention,
    _runs,
)
from vlmopt.compress.select import (
    PARTS,
    ModuleRef,
    NothingSelectedError,
    Parts,
    SelectionSpec,
    attention_kind_of,
    check_parts,
    position_of,
    role_of,
)
from vlmopt.compress.step import StepInputs, StepResult

__all__ = ["PruneLayersConfig", "apply_prune_layers", "final_name", "refresh_parts", "rename_after_prune"]

log = logging.getLogger(__name__)

#: Attributes that hold a layer's own index (OPT's and BLIP's KV-cache slot, BLIP text's layer number).
_INDEX_ATTRIBUTES = ("layer_idx", "layer_num")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True, kw_only=True)
class PruneLayersConfig(SelectionSpec):
    """Settings of one ``prune_layers`` step: one ``part`` and exactly one of ``drop_last``, ``keep``, ``layers``."""

    method = "prune_layers"

    drop_last: int | None = None
    keep: int | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.part, str) or self.part not in PARTS:
            raise ValueError(f"prune_layers: part must be one of {', '.join(PARTS)} (one part), got {self.part!r}")
        for key, default in (("position", "all"), ("role", "both"), ("modules", ())):
            if getattr(self, key) != default:
                raise ValueError(
                    f"prune_layers: {key} does not apply (the step removes whole layers); "
                    "choose the layers with drop_last, keep or layers"
                )
        given = [k for k in ("drop_last", "keep", "layers") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"prune_layers: give exactly one of drop_last, keep, layers; got {given or 'none'}")
        if self.drop_last is not None and not _positive_int(self.drop_last):
            raise ValueError(f"prune_layers: drop_last must be a positive integer, got {self.drop_last!r}")
        if self.keep is not None and not _positive_int(self.keep):
            raise ValueError(f"prune_layers: keep must be a positive integer, got {self.keep!r}")
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, str | int) or not layers:
                raise ValueError(f"prune_layers: layers must be a non-empty list of layer indices, got {layers!r}")
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError(f"prune_layers: layers must be non-negative integers, got {list(layers)}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"prune_layers: layers lists an index twice: {list(layers)}")
            object.__setattr__(self, "layers", tuple(layers))

    def dropped(self, n: int) -> list[int]:
        """Indices of the layers this step drops from a part of ``n`` layers, ascending."""
        if self.drop_last is not None:
            if self.drop_last >= n:
                raise ValueError(
                    f"prune_layers: drop_last={self.drop_last} would drop all {n} layers of part {self.part!r}; "
                    f"at most {n - 1}"
                )
            return list(range(n - self.drop_last, n))
        if self.keep is not None:
            if self.keep >= n:
                raise ValueError(
                    f"prune_layers: keep={self.keep} drops nothing from part {self.part!r}, which has {n} layers; "
                    f"keep must be below {n}"
                )
            return list(range(self.keep, n))
        assert self.layers is not None
        outside = [i for i in self.layers if i >= n]
        if outside:
            raise ValueError(
                f"prune_layers: layers {outside} are out of range for part {self.part!r}, which has {n} layers "
                f"(indices 0..{n - 1})"
            )
        if len(self.layers) >= n:
            raise ValueError(
                f"prune_layers: layers={list(self.layers)} would drop all {n} layers of part {self.part!r}"
            )
        return sorted(self.layers)

    def select(self, model: nn.Module, parts: Parts) -> list[ModuleRef]:
        """The Linear modules of the layers this step drops (the step's record of what it removes)."""
        check_parts(model, parts)
        layers = parts.get(self.part) or []
        if not layers:
            raise NothingSelectedError(f"prune_layers: the model has no {self.part!r} layers")
        n = len(layers)
        refs = []
        for index in self.dropped(n):
            layer_name, layer = layers[index]
            for local, module in layer.named_modules():
                if local and isinstance(module, nn.Linear):
                    refs.append(
                        ModuleRef(
                            name=f"{layer_name}.{local}",
                            part=self.part,
                            layer_index=index,
                            position=position_of(index, n),
                            role=role_of(local),
                            attention_kind=attention_kind_of(local),
                            module=module,
                        )
                    )
        return refs


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def apply_prune_layers(
    model: nn.Module, refs: list[ModuleRef], config: PruneLayersConfig, inputs: StepInputs
) -> StepResult:
    """Drop the configured layers of ``config.part`` in place; per removed module details and a summary.

    Everything is checked before the model changes. The summary names the dropped layers, the
    layer counts and the part's parameter counts before and after, and per layer list what it lost.
    """
    parts = inputs.parts
    layers = list(parts.get(config.part) or [])
    n = len(layers)
    dropped = config.dropped(n)
    lists = [_layer_list(model, config.part, prefix, start, run) for prefix, start, run in _runs(config.part, layers)]

    # Per list: its own indices of the dropped layers, and everything that must follow the change.
    plans = []
    for stack in lists:
        size = len(stack.container)
        local = [i - stack.start for i in dropped if stack.start <= i < stack.start + size]
        kept = [i for i in range(size) if i not in set(local)]
        if not kept:
            raise ValueError(
                f"prune_layers: the selection would drop every layer of {stack.prefix} (layers "
                f"{stack.start}..{stack.start + size - 1} of part {config.part!r}); keep at least one"
            )
        if not local:
            plans.append((stack, local, kept, [], None, None))
            continue
        _check_cross_attention(stack.config, config.part, kept, size)
        plans.append(
            (
                stack,
                local,
                kept,
                _bias_moves(stack, local),
                _renumbered_full_attention(stack.config, kept),
                _renumbered_feature_layer(model, stack.config_key, size, kept),
            )
        )
    _check_generation(lists, {id(stack): len(kept) for stack, _, kept, *_ in plans})

    part_before = sum(_count(layer) for _, layer in layers)
    entries = []
    for stack, local, kept, moves, full_attention, feature_layer in plans:
        size = len(stack.container)
        entry: dict[str, Any] = {
            "layer_list": stack.prefix,
            "dropped_layers": local,
            "layers_before": size,
            "layers_after": len(kept),
            "config_key": stack.record_key(),
        }
        entries.append(entry)
        if not local:
            continue
        layer_types = getattr(stack.config, "layer_types", None)
        for _, source, target in moves:
            setattr(target, _BIAS_TABLE, getattr(source, _BIAS_TABLE))
            setattr(target, _BIAS_FLAG, True)
        if moves:
            entry["moved_bias"] = [
                {"path": f"{path}.{_BIAS_TABLE}" if path else _BIAS_TABLE, "from_layer": 0, "to_layer": kept[0]}
                for path, _, _ in moves
            ]
        for index in reversed(local):
            del stack.container[index]
        for new_index, layer in enumerate(stack.container):
            for module in layer.modules():
                for attribute in _INDEX_ATTRIBUTES:
                    if isinstance(getattr(module, attribute, None), int):
                        setattr(module, attribute, new_index)
        setattr(stack.config, stack.count, len(kept))
        for copy in stack.copies:
            copy.num_hidden_layers = len(kept)
            if stack.count != "num_hidden_layers":
                setattr(copy, stack.count, len(kept))
        if isinstance(layer_types, list) and len(layer_types) == size and stack.count == "num_hidden_layers":
            stack.config.layer_types = [layer_types[i] for i in kept]
        if full_attention is not None:
            stack.config.fullatt_block_indexes = full_attention
            owner = model.get_submodule(stack.prefix.rpartition(".")[0]) if "." in stack.prefix else model
            if hasattr(owner, "fullatt_block_indexes"):
                owner.fullatt_block_indexes = list(full_attention)
        if feature_layer is not None:
            model.config.vision_feature_layer = feature_layer
    part_after = sum(_count(layer) for stack in lists for layer in stack.container)

    details = {
        ref.name: {"bits": ref.module.weight.dtype.itemsize * 8, "removed": True, "params": _count(ref.module)}
        for ref in refs
    }
    summary: dict[str, Any] = {
        "part": config.part,
        "dropped_layers": dropped,
        "dropped_names": [layers[i][0] for i in dropped],
        "layers_before": n,
        "layers_after": n - len(dropped),
        "layer_lists": entries,
        "part_params_before": part_before,
        "part_params_after": part_after,
    }
    if len(entries) == 1:
        summary["layer_list"] = entries[0]["layer_list"]
        summary["config_key"] = entries[0]["config_key"]
    log.info("prune_layers: dropped %s layers %s (%d -> %d layers)", config.part, dropped, n, n - len(dropped))
    return details, summary


def refresh_parts(model: nn.Module, parts: Parts) -> dict[str, list[tuple[str, nn.Module]]]:
    """``parts`` after a structural change: layers no longer in ``model`` left out, the rest under their new names."""
    names = {id(module): name for name, module in model.named_modules()}
    return {
        part: [(names[id(layer)], layer) for _, layer in layers if id(layer) in names] for part, layers in parts.items()
    }


def _layer_lists(structure: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The layer lists a ``prune_layers`` step entry records (older entries: the one flat ``layer_list``)."""
    if "layer_lists" in structure:
        return list(structure["layer_lists"])
    if "layer_list" in structure:
        return [{"layer_list": structure["layer_list"], "dropped_layers": structure["dropped_layers"]}]
    return []


def rename_after_prune(name: str, structure: Mapping[str, Any]) -> str | None:
    """The name that the module called ``name`` before a ``prune_layers`` step has after it (None: dropped).

    ``structure`` is the step entry's ``structure``: per layer list its path (``layer_list``) and
    the indices it dropped (``dropped_layers``), under ``layer_lists`` or, in entries written
    before a step could span several lists, as flat keys. Layers above a dropped one move down by
    the number of dropped layers below them.
    """
    for entry in _layer_lists(structure):
        head = f"{entry['layer_list']}."
        if not name.startswith(head):
            continue
        index, _, rest = name[len(head) :].partition(".")
        if not index.isdigit():
            return name
        dropped = entry["dropped_layers"]
        if int(index) in dropped:
            return None
        new = int(index) - sum(1 for d in dropped if d < int(index))
        return f"{head}{new}.{rest}" if rest else f"{head}{new}"
    return name


def final_name(name: str, later_steps: Iterable[Mapping[str, Any]]) -> str | None:
    """``name`` after the ``prune_layers`` steps among ``later_steps`` (manifest step entries, in order)."""
    current: str | None = name
    for step in later_steps:
        structure = step.get("structure") or {}
        if current is None:
            break
        if step.get("method") == "prune_layers" and _layer_lists(structure):
            current = rename_after_prune(current, structure)
    return current
