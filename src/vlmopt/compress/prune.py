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


#: A T5-style attention block that computes the stack's relative position bias, and its table.
_BIAS_FLAG = "has_relative_attention_bias"
_BIAS_TABLE = "relative_attention_bias"


@dataclass
class _LayerList:
    """One ``nn.ModuleList`` holding some of a part's layers, and the config entries that size it."""

    prefix: str  # module path of the list
    container: nn.ModuleList
    start: int  # index of its first layer in the part's list
    config: Any  # the sub-config of ``model.config`` that save_pretrained writes
    config_key: str  # its attribute on ``model.config`` ("" for ``model.config`` itself)
    count: str  # the attribute of ``config`` that holds this list's length
    copies: list[Any]  # per-module copies of ``config`` that also hold the length (a T5Stack's own config)

    def record_key(self) -> str:
        """``config_key`` and the count's attribute as ``config.json`` spells it (T5: ``num_layers``)."""
        attribute = dict(getattr(type(self.config), "attribute_map", None) or {}).get(self.count, self.count)
        return f"{self.config_key}.{attribute}" if self.config_key else attribute


def _container(model: nn.Module, part: str, prefix: str, layers: list[tuple[str, nn.Module]]) -> nn.ModuleList:
    """The ``nn.ModuleList`` at ``prefix`` holding exactly ``layers`` (named ``<prefix>.<i>``)."""
    container = model.get_submodule(prefix)
    if not isinstance(container, nn.ModuleList) or len(container) != len(layers):
        raise ValueError(f"prune_layers: {prefix} is not the list of the {len(layers)} {part!r} layers")
    for i, (name, layer) in enumerate(layers):
        if name != f"{prefix}.{i}" or container[i] is not layer:
            raise ValueError(f"prune_layers: the {part!r} layer list does not match {prefix} at index {i}")
    return container


def _runs(part: str, layers: list[tuple[str, nn.Module]]) -> list[tuple[str, int, list[tuple[str, nn.Module]]]]:
    """The part's layers cut into runs of one layer list each: (list path, start index, layers)."""
    runs: list[tuple[str, int, list[tuple[str, nn.Module]]]] = []
    for index, (name, layer) in enumerate(layers):
        prefix = name.rpartition(".")[0]
        if runs and runs[-1][0] == prefix:
            runs[-1][2].append((name, layer))
            continue
        if any(run[0] == prefix for run in runs):
            raise ValueError(
                f"prune_layers: the {part!r} layers of {prefix} are not consecutive in the part's list "
                f"(interrupted before index {index})"
            )
        runs.append((prefix, index, [(name, layer)]))
    return runs


def _count_attribute(config: Any, decoder: bool) -> str:
    """The attribute of ``config`` counting a stack's layers: T5's ``num_decoder_layers`` for its decoder."""
    if (
        decoder
        and getattr(config, "is_encoder_decoder", False)
        and isinstance(getattr(config, "num_decoder_layers", None), int)
    ):
        return "num_decoder_layers"
    return "num_hidden_layers"


def _sub_config_key(model: nn.Module, config: Any) -> str | None:
    """The attribute of ``model.config`` that is ``config`` ("" for ``model.config`` itself), None if none is."""
    top = getattr(model, "config", None)
    if top is config:
        return ""
    for key in dir(top) if top is not None else ():
        if not key.startswith("_") and getattr(top, key, None) is config:
            return key
    return None


def _layer_list(
    model: nn.Module, part: str, prefix: str, start: int, layers: list[tuple[str, nn.Module]]
) -> _LayerList:
    """The layer list at ``prefix`` with the sub-config that sized it.

    That is the nearest module above the list whose config counts ``len(layers)`` layers and is
    one of the sub-configs of ``model.config`` (which is what ``save_pretrained`` writes). Configs
    on the way that are per-module copies of it (T5 builds each stack from a deep copy of its
    config, the decoder's with ``num_layers`` set to ``num_decoder_layers``) are updated too.
    """
    container = _container(model, part, prefix, layers)
    n = len(layers)
    pieces = prefix.split(".")
    decoder = False
    copies: list[Any] = []
    for end in range(len(pieces) - 1, -1, -1):
        owner = model.get_submodule(".".join(pieces[:end])) if end else model
        decoder = decoder or getattr(owner, "is_decoder", False) is True
        candidate = getattr(owner, "config", None)
        if candidate is None:
            continue
        count = _count_attribute(candidate, decoder)
        if getattr(candidate, count, None) != n:
            continue
        key = _sub_config_key(model, candidate)
        if key is None:
            if getattr(candidate, "num_hidden_layers", None) == n:
                copies.append(candidate)
            continue
        strangers = [c for c in copies if type(c) is not type(candidate)]
        if strangers:
            raise ValueError(
                f"prune_layers: the layers of {prefix} are sized by a {type(strangers[0]).__name__} that is not part "
                "of the model's config, so the saved model would not keep the pruned layer count"
            )
        return _LayerList(prefix, container, start, candidate, key, count, copies)
    if copies:
        raise ValueError(
            f"prune_layers: the config of {prefix} is not a sub-config of the model's config, so the saved model "
            "would not keep the pruned layer count"
        )
    raise ValueError(f"prune_layers: found no config with num_hidden_layers={n} above {prefix}")


def _bias_moves(stack: _LayerList, dropped: list[int]) -> list[tuple[str, nn.Module, nn.Module]]:
    """Where the relative position bias of a dropped first layer goes: (path in a layer, from, to).

    The receiving module is the same submodule of the first kept layer; one that already owns a
    table (a stack whose every layer has its own) keeps it and nothing moves.
    """
    kept = [i for i in range(len(stack.container)) if i not in set(dropped)]
    if 0 not in dropped or not kept:
        return []
    first, new_first = stack.container[0], stack.container[kept[0]]
    moves = []
    for local, module in first.named_modules():
        if getattr(module, _BIAS_FLAG, False) is not True:
            continue
        table = getattr(module, _BIAS_TABLE, None)
        if not isinstance(table, nn.Module):
            raise ValueError(f"prune_layers: {stack.prefix}.0.{local} has {_BIAS_FLAG} set but no {_BIAS_TABLE}")
        try:
            target = new_first.get_submodule(local)
        except AttributeError:
            target = None
        if target is None or not hasattr(target, _BIAS_FLAG):
            raise ValueError(
                f"prune_layers: dropping {stack.prefix}.0 drops the stack's relative position bias, and "
                f"{stack.prefix}.{kept[0]} has no {local or 'block'} attention to take it over"
            )
        if getattr(target, _BIAS_FLAG) is True:
            continue
        moves.append((local, module, target))
    return moves


def _check_generation(lists: list[_LayerList], after: dict[int, int]) -> None:
    """Refuse leaving a T5 decoder with more blocks than its encoder (transformers 5 could not generate with it).

    transformers sizes T5's generation KV cache by ``num_layers``, the encoder's count; the decoder
    then indexes past its end. ``after`` maps ``id(layer list)`` to its length after the step.
    """
    for config in {id(s.config): s.config for s in lists}.values():
        if not (
            getattr(config, "is_encoder_decoder", False)
            and isinstance(getattr(config, "num_decoder_layers", None), int)
        ):
            continue
        counts = {"num_hidden_layers": config.num_hidden_layers, "num_decoder_layers": config.num_decoder_layers}
        new = dict(counts)
        for s in lists:
            if s.config is config:
                new[s.count] = after[id(s)]
        if new["num_decoder_layers"] > new["num_hidden_layers"] and not (
            counts["num_decoder_layers"] > counts["num_hidden_layers"]
        ):
            raise ValueError(
                f"prune_layers: the selection would leave {new['num_hidden_layers']} encoder and "
                f"{new['num_decoder_layers']} decoder blocks; transformers sizes the generation KV cache by the "
                "encoder's block count (num_layers), so a decoder with more blocks than its encoder cannot generate. "
                "Drop at least as many decoder blocks as encoder blocks"
            )


def _renumbered_full_attention(config: Any, kept: list[int]) -> list[int] | None:
    """Qwen2.5-VL's vision blocks with full (not windowed) attention, renumbered over the kept blocks.

    Without this a kept full-attention block would silently switch to window attention (or a
    stale index would point past the end) once the blocks below it move down.
    """
    indexes = getattr(config, "fullatt_block_indexes", None)
    if not isinstance(indexes, list | tuple):
        return None
    return [kept.index(i) for i in indexes if i in kept]


def _renumbered_feature_layer(model: nn.Module, config_key: str, n: int, kept: list[int]) -> Any:
    """LLaVA's ``vision_feature_layer`` after pruning vision layers, naming the same layer's output.

    It indexes the vision tower's hidden states (embeddings first, then one per layer), counting
    from the end when negative, so dropping layers shifts what it names. Dropping the layer whose
    output is the image feature is refused.
    """
    top = getattr(model, "config", None)
    feature = getattr(top, "vision_feature_layer", None)
    if config_key != "vision_config" or feature is None:
        return None

    def renumber(index: int) -> int:
        absolute = index + n + 1 if index < 0 else index
        if absolute == 0:
            return index  # the patch embeddings: no layer in front of them moves
        layer = absolute - 1
        if layer not in kept:
            raise ValueError(
                f"prune_layers: vision layer {layer} is the image feature the language model reads "
                f"(vision_feature_layer={index}); keep it"
            )
        new = kept.index(layer) + 1
        return new - (len(kept) + 1) if index < 0 else new

    return [renumber(i) for i in feature] if isinstance(feature, list | tuple) else renumber(int(feature))


def _check_cross_attention(config: Any, part: str, kept: list[int], n: int) -> None:
    """Refuse a selection after which the kept layers' cross-attention no longer follows the frequency."""
    frequency = getattr(config, "cross_attention_frequency", None)
    if not isinstance(frequency, int) or frequency <= 1:
        return
    has = [i % frequency == 0 for i in kept]
    expected = [j % frequency == 0 for j in range(len(kept))]
    if has != expected:
        raise ValueError(
            f"prune_layers: after dropping, the kept {part!r} layers {kept} of {n} would have cross-attention at "
            f"positions {[j for j, h in enumerate(has) if h]}, which cross_attention_frequency={frequency} cannot "
            f"describe (it needs {[j for j, e in enumerate(expected) if e]}); drop layers from the top instead"
        )


def apply_prune_layers(
    model: nn.Module, refs: list[ModuleRef], config: PruneLayersConfig, parts: Parts
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Drop the configured layers of ``config.part`` in place; per removed module details and a summary.

    Everything is checked before the model changes. The summary names the dropped layers, the
    layer counts and the part's parameter counts before and after, and per layer list what it lost.
    """
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
