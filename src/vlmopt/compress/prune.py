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

Since the step removes layers rather than changing weights, its selection is the Linear modules
of the dropped layers (recorded in the manifest like any other step's modules); the step entry's
``structure`` lists the dropped layers and the parameter counts before and after.

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


def _container(model: nn.Module, part: str, layers: list[tuple[str, nn.Module]]) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` holding ``layers`` (named ``<prefix>.<i>``), checked against the list."""
    prefixes = {name.rpartition(".")[0] for name, _ in layers}
    if len(prefixes) != 1:
        raise ValueError(f"prune_layers: the {part!r} layers do not sit in one layer list: {sorted(prefixes)}")
    prefix = prefixes.pop()
    container = model.get_submodule(prefix)
    if not isinstance(container, nn.ModuleList) or len(container) != len(layers):
        raise ValueError(f"prune_layers: {prefix} is not the list of the {len(layers)} {part!r} layers")
    for i, (name, layer) in enumerate(layers):
        if name != f"{prefix}.{i}" or container[i] is not layer:
            raise ValueError(f"prune_layers: the {part!r} layer list does not match {prefix} at index {i}")
    return prefix, container


def _layer_config(model: nn.Module, prefix: str, n: int) -> tuple[Any, str]:
    """The sub-config that sized the layer list at ``prefix``, and its attribute name on ``model.config``.

    The nearest module above the list whose ``config.num_hidden_layers`` is ``n``; it must be one of
    the sub-configs of ``model.config`` (which is what ``save_pretrained`` writes).
    """
    pieces = prefix.split(".")
    config = None
    for end in range(len(pieces) - 1, -1, -1):
        owner = model.get_submodule(".".join(pieces[:end])) if end else model
        candidate = getattr(owner, "config", None)
        if candidate is not None and getattr(candidate, "num_hidden_layers", None) == n:
            config = candidate
            break
    if config is None:
        raise ValueError(f"prune_layers: found no config with num_hidden_layers={n} above {prefix}")
    top = getattr(model, "config", None)
    if top is config:
        return config, ""
    for key in dir(top) if top is not None else ():
        if not key.startswith("_") and getattr(top, key, None) is config:
            return config, key
    raise ValueError(
        f"prune_layers: the config of {prefix} is not a sub-config of the model's config, so the saved model "
        "would not keep the pruned layer count"
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
    layer counts and the part's parameter counts before and after.
    """
    layers = list(parts.get(config.part) or [])
    n = len(layers)
    dropped = config.dropped(n)
    prefix, container = _container(model, config.part, layers)
    sub_config, config_key = _layer_config(model, prefix, n)
    kept = [i for i in range(n) if i not in set(dropped)]
    _check_cross_attention(sub_config, config.part, kept, n)
    layer_types = getattr(sub_config, "layer_types", None)
    full_attention = _renumbered_full_attention(sub_config, kept)
    feature_layer = _renumbered_feature_layer(model, config_key, n, kept)

    part_before = sum(_count(layer) for _, layer in layers)
    for index in reversed(dropped):
        del container[index]
    for new_index, layer in enumerate(container):
        for module in layer.modules():
            for attribute in _INDEX_ATTRIBUTES:
                if isinstance(getattr(module, attribute, None), int):
                    setattr(module, attribute, new_index)
    sub_config.num_hidden_layers = len(container)
    if isinstance(layer_types, list) and len(layer_types) == n:
        sub_config.layer_types = [layer_types[i] for i in kept]
    if full_attention is not None:
        sub_config.fullatt_block_indexes = full_attention
        owner = model.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else model
        if hasattr(owner, "fullatt_block_indexes"):
            owner.fullatt_block_indexes = list(full_attention)
    if feature_layer is not None:
        model.config.vision_feature_layer = feature_layer
    part_after = sum(_count(layer) for layer in container)

    details = {
        ref.name: {"bits": ref.module.weight.dtype.itemsize * 8, "removed": True, "params": _count(ref.module)}
        for ref in refs
    }
    summary = {
        "part": config.part,
        "dropped_layers": dropped,
        "dropped_names": [layers[i][0] for i in dropped],
        "layer_list": prefix,
        "layers_before": n,
        "layers_after": len(container),
        "config_key": f"{config_key}.num_hidden_layers" if config_key else "num_hidden_layers",
        "part_params_before": part_before,
        "part_params_after": part_after,
    }
    log.info("prune_layers: dropped %s layers %s (%d -> %d layers)", config.part, dropped, n, len(container))
    return details, summary


def refresh_parts(model: nn.Module, parts: Parts) -> dict[str, list[tuple[str, nn.Module]]]:
    """``parts`` after a structural change: layers no longer in ``model`` left out, the rest under their new names."""
    names = {id(module): name for name, module in model.named_modules()}
    return {
        part: [(names[id(layer)], layer) for _, layer in layers if id(layer) in names] for part, layers in parts.items()
    }


def rename_after_prune(name: str, structure: Mapping[str, Any]) -> str | None:
    """The name that the module called ``name`` before a ``prune_layers`` step has after it (None: dropped).

    ``structure`` is the step entry's ``structure`` (its ``layer_list`` and ``dropped_layers``):
    layers above a dropped one move down by the number of dropped layers below them.
    """
    head = f"{structure['layer_list']}."
    if not name.startswith(head):
        return name
    index, _, rest = name[len(head) :].partition(".")
    if not index.isdigit():
        return name
    dropped = structure["dropped_layers"]
    if int(index) in dropped:
        return None
    new = int(index) - sum(1 for d in dropped if d < int(index))
    return f"{head}{new}.{rest}" if rest else f"{head}{new}"


def final_name(name: str, later_steps: Iterable[Mapping[str, Any]]) -> str | None:
    """``name`` after the ``prune_layers`` steps among ``later_steps`` (manifest step entries, in order)."""
    current: str | None = name
    for step in later_steps:
        structure = step.get("structure") or {}
        if current is None:
            break
        if step.get("method") == "prune_layers" and "layer_list" in structure:
            current = rename_after_prune(current, structure)
    return current
