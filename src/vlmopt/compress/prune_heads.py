"""Attention-head pruning: remove whole heads from attention blocks (real, not simulated).

A ``prune_heads`` step removes, from every selected attention block, ``heads`` heads (or
``fraction`` of the block's heads, rounded down) with the lowest importance, and rebuilds the
block's projections as smaller ``nn.Linear`` modules: the query, key and value projections lose
the removed heads' output rows (three row blocks of a fused ``qkv``, laid out ``[q | k | v]`` or,
in Persimmon, ``[q_h; k_h; v_h]`` per head), the output projection loses
their input columns, and the block's head count shrinks while the head width stays. Parameters
and multiply-adds really drop, and the pruned block computes exactly what the original computes
with the removed heads' output-projection input columns set to zero. Cross-attention keys and
values read the encoder's width, so only their output rows shrink. Michel et al. found that many
heads can go with little loss, which makes heads a natural structural unit between single
weights and whole layers (:mod:`vlmopt.compress.prune_layers`).

Grouped-query attention (Llama, Qwen2; Ainslie et al., https://arxiv.org/abs/2305.13245) shares
one key and value head among ``group`` query heads. There the unit removed is a whole group: the
key-value head and its query heads go together, and ``heads`` / ``fraction`` count groups (in a
block with one query head per key-value head, as in LLaVA's Llama, a group is a head). Removing
query heads inside groups instead would shrink only the query and output projections: the key and
value projections and the key-value cache, which is what grouped-query attention exists to keep
small, would stay as they are. Whole groups shrink all four projections and the cache by the
same share, and the block stays a regular grouped-query block with the same group size, so the
stock forward and every attention implementation run unchanged. The price is granularity where
groups are few (Qwen2.5-VL-3B's language layers have 2 key-value heads of 8 query heads: one
group is half the block).

T5 and Pix2Struct text attention add a learned relative position bias with one column per head.
Only the stack's first layer holds the table, and the bias it computes is handed on to every later
layer of the stack, so head ``h`` of every layer reads column ``h``. A pruned block therefore
keeps the table whole (a few hundred numbers) and passes the full-width bias on, and takes for
itself the columns of the heads it kept (recorded in the manifest as ``bias_heads``, indices
into the original heads); layers that keep all their heads see exactly what they saw before.

Importance (``criterion``) is computed from the weights alone, so the step needs no data. For
head ``h`` with value-projection rows ``V_h`` (``head_dim`` x input width) and output-projection
input columns ``O_h`` (output width x ``head_dim``), biases not counted:

- ``l2`` (default): ``||V_h||_F * ||O_h||_F``, an upper bound on the size of the head's
  value-to-output map ``O_h V_h`` (what the head adds to the residual stream is ``O_h V_h``
  applied to an attention-weighted average of its inputs);
- ``ov``: ``||O_h V_h||_F``, that map's own Frobenius norm.

A grouped-query block scores each group from its shared value rows ``V_g`` and the output
columns ``O_g`` of all its query heads: ``||V_g||_F * ||O_g||_F`` (``l2``) and
``sqrt(sum_h ||O_h V_g||_F^2)`` over the group's query heads ``h`` (``ov``); with one query head
per group these are the formulas above.

The lowest scores go first; ties remove the lower head index first. Removing every head of a
block is an error, and so is a setting that removes none.

Selection: the usual ``part``, ``position`` and ``role`` (``attention`` by default, or
``self_attention`` / ``cross_attention``) choose the attention Linear modules; each must belong to
an attention block of a layout in :data:`~vlmopt.compress.attention_layouts.LAYOUTS` (a small
table per architecture: which child modules are the projections and which attributes hold the
head count and width), so adding an architecture is one table row.

A compressed folder is read back with :func:`~vlmopt.compress.prune_heads_saved.load_head_pruned`
and :func:`~vlmopt.compress.prune_heads_saved.restore_pruned_heads`.

Method: Michel, Levy and Neubig, "Are Sixteen Heads Really Better than One?", NeurIPS 2019,
https://arxiv.org/abs/1905.10650 (they rank heads by a gradient-based importance on data; the
default here is a data-free weight norm).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmopt.compress.attention_blocks import AttentionBlock, attention_blocks
from vlmopt.compress.attention_layouts import BIAS_HEADS, BIAS_WIDTH, METHOD, _is_count, _set_heads
from vlmopt.compress.select import ModuleRef, NothingSelectedError, Parts, SelectionSpec
from vlmopt.compress.step import StepInputs, StepResult

__all__ = ["CRITERIA", "PruneHeadsConfig", "apply_prune_heads", "head_scores", "shrink_block"]

log = logging.getLogger(__name__)

#: Importance criteria (see the module docstring); the first is the default.
CRITERIA = ("l2", "ov")
ATTENTION_ROLES = ("attention", "self_attention", "cross_attention")


def _head_index(heads: Sequence[int], num_heads: int, head_dim: int, chunks: int = 1) -> torch.Tensor:
    """Row (or column) indices of ``heads`` in ``chunks`` consecutive blocks of ``num_heads * head_dim``."""
    within = (torch.as_tensor(list(heads), dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).flatten()
    return torch.cat([c * num_heads * head_dim + within for c in range(chunks)])


def _value_and_output(block: AttentionBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group: value rows ``(g, d, in)`` and its query heads' output columns ``(g, out, group, d)``, float64.

    ``g`` is the number of key-value groups (the number of heads outside grouped-query layouts,
    where ``group`` is 1).
    """
    n, d, group = block.num_heads, block.head_dim, block.group_size
    if block.layout.qkv is not None:
        qkv = block.projection("qkv").weight.detach()
        if block.layout.qkv_per_head:
            value = qkv.reshape(n, 3, d, -1)[:, 2]
        else:
            value = qkv[2 * n * d : 3 * n * d]
    else:
        value = block.projection("value").weight.detach()
    out = block.projection("out").weight.detach()
    value = value.to(torch.float64).reshape(n // group, d, -1)
    out = out.to(torch.float64).reshape(out.shape[0], n // group, group, d).permute(1, 0, 2, 3)
    return value, out


@torch.no_grad()
def head_scores(block: AttentionBlock, criterion: str = "l2") -> torch.Tensor:
    """Importance of each head (each key-value group in grouped-query layouts) of ``block``; float64.

    See the module docstring for the criteria.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"{METHOD}: criterion={criterion!r} is not allowed; choose one of {', '.join(CRITERIA)}")
    value, out = _value_and_output(block)
    if criterion == "l2":
        return value.flatten(1).norm(dim=1) * out.flatten(1).norm(dim=1)
    # ||O_h V||_F^2 = <O_h^T O_h, V V^T>: (d x d) Gram matrices instead of (out x in) products, summed
    # over the group's query heads h.
    gram_out = torch.einsum("uohd,uohe->ude", out, out)
    gram_value = value @ value.transpose(1, 2)
    return (gram_out * gram_value).sum(dim=(1, 2)).clamp_min(0).sqrt()


def _sliced_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear holding the rows (``dim=0``) or input columns (``dim=1``) ``index`` of ``linear``."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    out_features, in_features = weight.shape
    new = _empty_linear(in_features, out_features, linear.bias is not None, like=linear.weight)
    new.weight.copy_(weight)
    if linear.bias is not None:
        bias = linear.bias.detach()
        new.bias.copy_(bias.index_select(0, index.to(bias.device)) if dim == 0 else bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    if linear.bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    new.train(linear.training)
    return new


def _empty_linear(in_features: int, out_features: int, bias: bool, *, like: torch.Tensor) -> nn.Linear:
    return torch.nn.utils.skip_init(
        nn.Linear, in_features, out_features, bias=bias, device=like.device, dtype=like.dtype
    )


def _params(linear: nn.Linear) -> int:
    return linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)


def _query_heads(groups: Sequence[int], group_size: int) -> list[int]:
    """The query heads of key-value ``groups`` (query head ``h`` reads key-value head ``h // group_size``)."""
    return [g * group_size + j for g in groups for j in range(group_size)]


@torch.no_grad()
def shrink_block(block: AttentionBlock, kept: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Keep only heads ``kept`` of ``block`` in place; per projection (local path): shapes and parameters.

    In a grouped-query block ``kept`` lists key-value groups (see :attr:`AttentionBlock.num_groups`).
    """
    n, d, group = block.num_heads, block.head_dim, block.group_size
    units = n // group
    kept = sorted(kept)
    if not kept or len(set(kept)) != len(kept) or not all(0 <= h < units for h in kept):
        noun = "heads" if group == 1 else "key-value groups"
        raise ValueError(f"{METHOD}: cannot keep {noun} {kept} of {block.name}, which has {units} {noun}")
    heads = _query_heads(kept, group)
    bias_heads = bias_width = None
    if block.layout.shared_bias:
        before = getattr(block.module, BIAS_HEADS, None)
        before = tuple(range(n)) if before is None else before
        bias_heads, bias_width = [before[h] for h in heads], int(getattr(block.module, BIAS_WIDTH, n))
    changes: dict[str, dict[str, Any]] = {}
    for role, path in block.layout.projections().items():
        linear = block.projection(role)
        if role == "out":
            new = _sliced_linear(linear, _head_index(heads, n, d), dim=1)
        elif role == "qkv" and block.layout.qkv_per_head:
            new = _sliced_linear(linear, _head_index(heads, n, 3 * d), dim=0)
        elif role == "qkv":
            new = _sliced_linear(linear, _head_index(heads, n, d, chunks=3), dim=0)
        elif role == "query":
            new = _sliced_linear(linear, _head_index(heads, n, d), dim=0)
        else:
            new = _sliced_linear(linear, _head_index(kept, units, d), dim=0)
        parent, _, child = path.rpartition(".")
        setattr(block.module.get_submodule(parent) if parent else block.module, child, new)
        changes[path] = {
            "projection": role,
            "out_features_before": linear.out_features,
            "in_features_before": linear.in_features,
            "out_features_after": new.out_features,
            "in_features_after": new.in_features,
            "bias": linear.bias is not None,
            "params_before": _params(linear),
            "params_after": _params(new),
        }
    _set_heads(block.module, block.layout, len(heads), bias_heads=bias_heads, bias_width=bias_width)
    return changes


@dataclass(frozen=True, kw_only=True)
class PruneHeadsConfig(SelectionSpec):
    """Settings of one ``prune_heads`` step: exactly one of ``heads`` or ``fraction``, a ``criterion``, the selection.

    ``heads``: heads removed from each selected block; ``fraction`` (0 < fraction < 1): that
    share of each block's heads removed, rounded down (in grouped-query blocks both count
    key-value groups); ``criterion``: ``l2`` (default) or ``ov``. ``role`` defaults to
    ``attention`` and must be an attention role.
    """

    method = METHOD

    role: str | tuple[str, ...] = "attention"
    heads: int | None = None
    fraction: float | None = None
    criterion: str = CRITERIA[0]

    def __post_init__(self) -> None:
        super().__post_init__()
        roles = (self.role,) if isinstance(self.role, str) else self.role
        for role in roles:
            if role not in ATTENTION_ROLES:
                raise ValueError(
                    f"{METHOD}: role={role!r} is not allowed: heads live in attention blocks; "
                    f"choose one or more of {', '.join(ATTENTION_ROLES)}"
                )
        if self.modules:
            raise ValueError(
                f"{METHOD}: modules does not apply (the step prunes whole attention blocks); "
                "choose the blocks with part, position and role"
            )
        if (self.heads is None) == (self.fraction is None):
            raise ValueError(
                f"{METHOD}: give exactly one of heads (heads removed per block) or fraction (share of each block's "
                f"heads removed), got heads={self.heads!r}, fraction={self.fraction!r}"
            )
        if self.heads is not None and not _is_count(self.heads):
            raise ValueError(f"{METHOD}: heads must be a positive integer, got {self.heads!r}")
        if self.fraction is not None:
            number = isinstance(self.fraction, int | float) and not isinstance(self.fraction, bool)
            if not number or not 0 < self.fraction < 1:
                raise ValueError(f"{METHOD}: fraction must be a number with 0 < fraction < 1, got {self.fraction!r}")
            object.__setattr__(self, "fraction", float(self.fraction))
        if self.criterion not in CRITERIA:
            raise ValueError(
                f"{METHOD}: criterion={self.criterion!r} is not allowed; choose one of {', '.join(CRITERIA)}"
            )

    def removed_for(self, num_heads: int, block: str, unit: str = "head") -> int:
        """How many of a block's ``num_heads`` heads (or other ``unit``) this step removes; refuses all or none."""
        if self.heads is not None:
            if self.heads >= num_heads:
                raise ValueError(
                    f"{METHOD}: heads={self.heads} would remove all {num_heads} {unit}s of {block}; "
                    f"at most {num_heads - 1}"
                )
            return self.heads
        assert self.fraction is not None
        removed = int(self.fraction * num_heads)
        if removed < 1:
            raise ValueError(
                f"{METHOD}: fraction={self.fraction} removes no {unit} of {block}, which has {num_heads} {unit}s "
                f"(int({self.fraction} * {num_heads}) = 0); raise fraction or give heads"
            )
        return removed

    def select(self, model: nn.Module, parts: Parts) -> list[ModuleRef]:
        """The projections of the selected attention blocks (checked to form whole, known blocks)."""
        refs = super().select(model, parts)
        attention_blocks(model, parts, refs)
        return refs


def apply_prune_heads(
    model: nn.Module, refs: list[ModuleRef], config: PruneHeadsConfig, inputs: StepInputs
) -> StepResult:
    """Remove the lowest-scoring heads of every selected block in place; per-module details and a summary.

    Every block is scored and checked before any changes, so a bad setting leaves the model
    intact. Head indices are those of the block as the step finds it.
    """
    parts = inputs.parts
    blocks = attention_blocks(model, parts, refs)
    if not blocks:
        raise NothingSelectedError(f"{METHOD}: the selection holds no attention block")
    plans = []
    for block in blocks:
        units = block.num_groups
        unit = "head" if block.group_size == 1 else "key-value group"
        removed_count = config.removed_for(units, block.name, unit)
        scores = head_scores(block, config.criterion)
        order = sorted(range(units), key=lambda h: (float(scores[h]), h))
        plans.append((block, sorted(order[:removed_count]), sorted(order[removed_count:]), scores.tolist()))

    details: dict[str, dict[str, Any]] = {}
    summaries = []
    for block, removed, kept, scores in plans:
        n, d, group = block.num_heads, block.head_dim, block.group_size
        bits = block.projection("out").weight.dtype.itemsize * 8
        changes = shrink_block(block, kept)
        heads: dict[str, Any] = {
            "block": block.name,
            "layout": block.layout.name,
            "heads_before": n,
            "heads_after": len(kept) * group,
            "head_dim": d,
            "heads_kept": _query_heads(kept, group),
            "heads_removed": _query_heads(removed, group),
            "head_scores": scores,
        }
        if block.layout.kv_groups is not None:
            heads.update(
                group_size=group, kv_heads_before=n // group, kv_heads_after=len(kept), kv_heads_removed=removed
            )
        if block.layout.shared_bias:
            heads.update(
                bias_heads=list(getattr(block.module, BIAS_HEADS)), bias_width=getattr(block.module, BIAS_WIDTH)
            )
        for path, change in changes.items():
            details[f"{block.name}.{path}"] = {"bits": bits, **heads, **change}
        summaries.append(
            {
                **heads,
                "part": block.part,
                "layer_index": block.layer_index,
                "attention_kind": block.attention_kind,
                "params_before": sum(c["params_before"] for c in changes.values()),
                "params_after": sum(c["params_after"] for c in changes.values()),
            }
        )
        kept_heads, removed_heads = heads["heads_kept"], heads["heads_removed"]
        log.info("%s: %s keeps heads %s of %d (removed %s)", METHOD, block.name, kept_heads, n, removed_heads)
    summary = {
        "criterion": config.criterion,
        "blocks": summaries,
        "n_blocks": len(summaries),
        "heads_before": sum(s["heads_before"] for s in summaries),
        "heads_after": sum(s["heads_after"] for s in summaries),
        "module_params_before": sum(s["params_before"] for s in summaries),
        "module_params_after": sum(s["params_after"] for s in summaries),
    }
    log.info(
        "%s: %d blocks, heads %d -> %d, their parameters %d -> %d",
        METHOD,
        len(summaries),
        summary["heads_before"],
        summary["heads_after"],
        summary["module_params_before"],
        summary["module_params_after"],
    )
    return details, summary
