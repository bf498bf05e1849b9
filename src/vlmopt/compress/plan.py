"""A variant checked against a model's structure before any weight is read.

A study's variants meet its models when the DAG is built, long before the compress job loads
weights (and after the GPU-hours of finetuning). :func:`plan_variant` runs every check that
needs only the model's structure, on a model whose parameters live on the ``meta`` device
(:meth:`vlmopt.models.FamilyAdapter.skeleton`): the step order, each step's selection (a part
the family lacks, a position or module pattern that matches nothing), weights shared with
modules outside the selection, and the layer counts ``prune_layers`` works on. Later steps see
the layers a ``prune_layers`` step keeps. Steps after an ``opaque`` method (``svd``,
``prune_heads``) are not planned: what they select depends on the factorized or narrowed
modules, which only the real step builds; the compress job checks them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from vlmopt.compress.select import Parts
from vlmopt.compress.variant import check_step_order, check_weights, parse_step

__all__ = ["plan_variant"]


def plan_variant(model: nn.Module, parts: Parts, steps: list[Mapping[str, Any]]) -> list[int]:
    """Check ``steps`` against ``model``'s structure; the number of modules each planned step selects.

    Raises ValueError naming the step (``step <i>: ...``) for the first problem. ``model`` may
    hold meta tensors: nothing here reads a weight value. The list is shorter than ``steps``
    when an ``opaque`` step (:class:`~vlmopt.compress.methods.Method`) comes before the last one.
    """
    parsed = []
    for index, step in enumerate(steps):
        try:
            parsed.append(parse_step(step))
        except ValueError as err:
            raise ValueError(f"step {index}: {err}") from None
    check_step_order(parsed)
    parts = {name: list(layers) for name, layers in parts.items()}
    counts = []
    for index, (method, config) in enumerate(parsed):
        try:
            refs = config.select(model, parts)
            check_weights(model, refs, config.method)
        except ValueError as err:
            raise ValueError(f"step {index}: {err}") from None
        counts.append(len(refs))
        if method.opaque:
            break
        if config.method == "prune_layers":
            layers = parts[config.part]
            dropped = set(config.dropped(len(layers)))
            parts[config.part] = [layer for i, layer in enumerate(layers) if i not in dropped]
    return counts
