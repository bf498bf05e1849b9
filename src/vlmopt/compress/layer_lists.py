"""The layer lists that a ``prune_layers`` step shortens, and what has to change with them.

A part's layers may span several ``nn.ModuleList`` containers (BLIP-2 Flan-T5's ``language`` part
is the T5 encoder's blocks, then the decoder's). ``_runs`` cuts a part into one run per list, and
``_layer_list`` finds for each list the sub-config of ``model.config`` that counts its layers,
with the per-module copies of it that also hold the count (each ``T5Stack`` keeps one), so the
saved config keeps the pruned count. The other helpers work out, before the model changes, what
follows from dropping layers: where a dropped first block's relative position bias goes
(``_bias_moves``), Qwen2.5-VL's full-attention block indices and LLaVA's ``vision_feature_layer``
after renumbering, and the refusal of a Q-Former whose kept layers break its cross-attention
frequency or of a T5 decoder left with more blocks than its encoder. The step itself is
:func:`vlmopt.compress.prune_layers.apply_prune_layers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

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
