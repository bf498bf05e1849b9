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
weights and whole layers (:mod:`vlmopt.compress.prune`).

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
an attention block of a layout in :data:`LAYOUTS` (a small table per architecture: which child
modules are the projections and which attributes hold the head count and width), so adding an
architecture is one table row.

``from_pretrained`` builds full-size attention from the config and refuses the smaller saved
tensors, so a compressed folder is read back with :func:`load_head_pruned` (which lets those
tensors through as freshly initialized placeholders) followed by :func:`restore_pruned_heads`
(names and shapes from the manifest, weights from the folder's safetensors), before
:func:`~vlmopt.compress.svd.restore_structure` when an ``svd`` step later factorized the
pruned projections.

Method: Michel, Levy and Neubig, "Are Sixteen Heads Really Better than One?", NeurIPS 2019,
https://arxiv.org/abs/1905.10650 (they rank heads by a gradient-based importance on data; the
default here is a data-free weight norm).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmopt.compress.prune import final_name
from vlmopt.compress.select import ModuleRef, NothingSelectedError, Parts, SelectionSpec
from vlmopt.compress.svd import saved_key_names, svd_modules

__all__ = [
    "CRITERIA",
    "LAYOUTS",
    "AttentionBlock",
    "AttentionLayout",
    "PruneHeadsConfig",
    "apply_prune_heads",
    "attention_blocks",
    "head_pruned_modules",
    "head_scores",
    "layout_of",
    "load_head_pruned",
    "restore_pruned_heads",
    "shrink_block",
]

log = logging.getLogger(__name__)

METHOD = "prune_heads"
#: Importance criteria (see the module docstring); the first is the default.
CRITERIA = ("l2", "ov")
ATTENTION_ROLES = ("attention", "self_attention", "cross_attention")


#: Attributes a head-pruned block with a shared relative position bias keeps: the original indices
#: of its heads (columns of the stack's bias) and the bias's full width.
BIAS_HEADS = "pruned_bias_heads"
BIAS_WIDTH = "pruned_bias_width"


def _fused_qkv_forward(
    layout: AttentionLayout, module: nn.Module, hidden_states: torch.Tensor, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of a head-pruned ViT attention with a fused ``qkv`` (BLIP and BLIP-2 vision).

    The stock forward takes the head width from the input width (``embed_dim // num_heads``),
    which no longer holds once heads are gone; this one reads ``head_dim``. Same math as BLIP's
    eager attention: ``softmax(q k^T * scale) v``, dropout on the probabilities while training.
    """
    bsz, tgt_len, _ = hidden_states.shape
    num_heads, head_dim = getattr(module, layout.num_heads), getattr(module, layout.head_dim)
    assert layout.qkv is not None
    mixed = module.get_submodule(layout.qkv)(hidden_states)
    mixed = mixed.reshape(bsz, tgt_len, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    query, key, value = mixed[0], mixed[1], mixed[2]
    probs = torch.softmax(torch.matmul(query, key.transpose(-1, -2)) * module.scale, dim=-1)
    dropout = getattr(module, "dropout", None)
    p = dropout.p if isinstance(dropout, nn.Dropout) else float(getattr(module, "attention_dropout", 0.0))
    dropped = nn.functional.dropout(probs, p=p, training=module.training)
    context = torch.matmul(dropped, value).permute(0, 2, 1, 3).reshape(bsz, tgt_len, num_heads * head_dim)
    return module.get_submodule(layout.out)(context), probs


def _shared_bias_forward(
    layout: AttentionLayout,
    module: nn.Module,
    hidden_states: torch.Tensor,
    mask: Any = None,
    key_value_states: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Forward of a head-pruned T5-style attention whose position bias is shared along the stack.

    The stack hands every layer the bias that its first layer computed, one column per original
    head (a zero bias where there is no relative table). This block runs its stock forward on the
    columns of the heads it kept and hands on the full-width bias, so later layers, pruned or not,
    get what they would get from the unpruned first layer.
    """
    stock = type(module).forward
    width = int(getattr(module, BIAS_WIDTH))
    heads = torch.as_tensor(getattr(module, BIAS_HEADS), dtype=torch.long)
    call = functools.partial(
        stock,
        module,
        hidden_states,
        mask=mask,
        key_value_states=key_value_states,
        past_key_values=past_key_values,
        **kwargs,
    )
    if position_bias is not None:
        if position_bias.shape[1] != width:
            raise ValueError(
                f"{METHOD}: a head-pruned attention block got a position bias for {position_bias.shape[1]} heads, "
                f"expected the stack's {width}"
            )
        output, _, weights = call(position_bias=position_bias.index_select(1, heads.to(position_bias.device)))
        return output, position_bias, weights
    if not getattr(module, "has_relative_attention_bias", False):
        output, zeros, weights = call(position_bias=None)
        return output, zeros.new_zeros((zeros.shape[0], width, *zeros.shape[2:])), weights
    full: list[torch.Tensor] = []

    def compute_bias(*args: Any, **bias_kwargs: Any) -> torch.Tensor:
        full.append(type(module).compute_bias(module, *args, **bias_kwargs))
        return full[-1].index_select(1, heads.to(full[-1].device))

    module.compute_bias = compute_bias
    try:
        output, _, weights = call(position_bias=None)
    finally:
        del module.compute_bias
    return output, full[-1], weights


@dataclass(frozen=True)
class AttentionLayout:
    """Where one attention implementation keeps its projections and head bookkeeping.

    Paths are relative to the attention block (the module holding all projections). ``owner`` is
    the submodule (``""``: the block) whose attribute ``head_dim`` holds the head width and
    ``num_heads`` the (query) head count; ``num_heads=None`` means the block keeps no count (its
    forward infers it from the tensor shapes) and the count is the query projection's outputs over
    the head width. ``all_head_size``, when set, names the attribute holding count x width.
    ``kv_groups`` names the attribute holding the query heads per key-value head of a
    grouped-query block (whole groups are pruned; the key and value projections have one head per
    group), and ``kv_heads`` the attribute holding the key-value head count, if any. A fused
    ``qkv`` has rows ``[q | k | v]`` (each ``num_heads * head_dim``), or ``[q_h; k_h; v_h]`` per
    head ``h`` when ``qkv_per_head``. ``marker``: an attribute the block must have to be of this
    layout (telling apart blocks with the same projection names). ``shared_bias``: the block may
    read a relative position bias shared along its stack (see the module docstring). ``forward``,
    when set, replaces the block's forward once its heads are pruned (for implementations whose
    stock forward cannot run with fewer heads).
    """

    name: str
    out: str
    num_heads: str | None
    head_dim: str
    query: str | None = None
    key: str | None = None
    value: str | None = None
    qkv: str | None = None
    owner: str = ""
    all_head_size: str | None = None
    kv_groups: str | None = None
    kv_heads: str | None = None
    qkv_per_head: bool = False
    marker: str | None = None
    shared_bias: bool = False
    forward: Callable[..., Any] | None = field(default=None, compare=False, repr=False)

    def projections(self) -> dict[str, str]:
        """``{"query": path, "key": path, "value": path, "out": path}`` or ``{"qkv": path, "out": path}``."""
        if self.qkv is not None:
            return {"qkv": self.qkv, "out": self.out}
        assert self.query is not None and self.key is not None and self.value is not None
        return {"query": self.query, "key": self.key, "value": self.value, "out": self.out}


#: Known attention blocks (transformers 5 ``modeling_<name>.py``). What the stock forwards read:
#: OPT and CLIP ``num_heads`` and ``head_dim`` (``view(bsz, -1, num_heads, head_dim)``); BLIP text
#: and the Q-Former ``attention_head_size`` (``view(..., -1, attention_head_size)``), with
#: ``num_attention_heads`` and ``all_head_size`` kept consistent; the BLIP/BLIP-2 ViT ``num_heads``
#: with the width from the input, hence its own forward; Llama and Qwen2 ``head_dim``
#: (``view(..., -1, head_dim)``) and ``num_key_value_groups`` (unchanged by whole-group pruning);
#: T5 and Pix2Struct ``key_value_proj_dim`` (``view(..., -1, key_value_proj_dim)``), and
#: ``n_heads`` for the zero bias of blocks without a relative table; Persimmon ``num_heads``
#: (``view(b, s, num_heads, 3, head_dim)``; its q/k layer norms act on one head's width and are
#: shared by all heads, the rotary dimensions are per head); the Qwen2.5-VL ViT ``num_heads``
#: (``reshape(s, 3, num_heads, -1)``).
LAYOUTS: tuple[AttentionLayout, ...] = (
    # OPT decoder self-attention (``self_attn``); also CLIP's (CLIP, GIT and LLaVA vision towers).
    AttentionLayout(
        "opt", query="q_proj", key="k_proj", value="v_proj", out="out_proj", num_heads="num_heads", head_dim="head_dim"
    ),
    # BLIP and BLIP-2 vision self-attention (``self_attn``): fused ``qkv`` rows are [q | k | v].
    AttentionLayout(
        "vit_fused_qkv",
        qkv="qkv",
        out="projection",
        num_heads="num_heads",
        head_dim="head_dim",
        forward=_fused_qkv_forward,
    ),
    # BLIP text decoder self- and cross-attention (``attention``, ``crossattention``); GIT.
    AttentionLayout(
        "bert",
        query="self.query",
        key="self.key",
        value="self.value",
        out="output.dense",
        owner="self",
        num_heads="num_attention_heads",
        head_dim="attention_head_size",
        all_head_size="all_head_size",
    ),
    # BLIP-2 Q-Former self- and cross-attention (``attention``, ``crossattention``).
    AttentionLayout(
        "qformer",
        query="attention.query",
        key="attention.key",
        value="attention.value",
        out="output.dense",
        owner="attention",
        num_heads="num_attention_heads",
        head_dim="attention_head_size",
        all_head_size="all_head_size",
    ),
    # Qwen2 / Qwen2.5-VL text self-attention (``self_attn``): grouped-query, q/k/v with bias.
    AttentionLayout(
        "qwen2",
        query="q_proj",
        key="k_proj",
        value="v_proj",
        out="o_proj",
        num_heads="num_heads",
        head_dim="head_dim",
        kv_groups="num_key_value_groups",
        kv_heads="num_key_value_heads",
    ),
    # Llama self-attention (``self_attn``; LLaVA's language model): grouped-query, no head count kept.
    AttentionLayout(
        "llama",
        query="q_proj",
        key="k_proj",
        value="v_proj",
        out="o_proj",
        num_heads=None,
        head_dim="head_dim",
        kv_groups="num_key_value_groups",
    ),
    # T5 self- and cross-attention (``SelfAttention``, ``EncDecAttention``; BLIP-2 with Flan-T5).
    AttentionLayout(
        "t5",
        query="q",
        key="k",
        value="v",
        out="o",
        num_heads="n_heads",
        head_dim="key_value_proj_dim",
        all_head_size="inner_dim",
        marker="has_relative_attention_bias",
        shared_bias=True,
        forward=_shared_bias_forward,
    ),
    # Pix2Struct text self- and cross-attention (``self_attention.attention``, ``encoder_decoder_attention.attention``).
    AttentionLayout(
        "pix2struct_text",
        query="query",
        key="key",
        value="value",
        out="output",
        num_heads="n_heads",
        head_dim="key_value_proj_dim",
        all_head_size="inner_dim",
        marker="has_relative_attention_bias",
        shared_bias=True,
        forward=_shared_bias_forward,
    ),
    # Pix2Struct vision self-attention (``attention``): no position bias.
    AttentionLayout(
        "pix2struct_vision",
        query="query",
        key="key",
        value="value",
        out="output",
        num_heads="n_heads",
        head_dim="key_value_proj_dim",
        all_head_size="inner_dim",
    ),
    # Persimmon self-attention (``self_attn``; Fuyu): fused ``query_key_value`` rows are [q_h; k_h; v_h] per head.
    AttentionLayout(
        "persimmon",
        qkv="query_key_value",
        out="dense",
        num_heads="num_heads",
        head_dim="head_dim",
        qkv_per_head=True,
    ),
    # Qwen2.5-VL vision self-attention (``attn``): fused ``qkv`` rows are [q | k | v], output ``proj``.
    AttentionLayout("qwen_vision", qkv="qkv", out="proj", num_heads="num_heads", head_dim="head_dim"),
)

_LAYOUT_BY_NAME = {layout.name: layout for layout in LAYOUTS}


def _child(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path) if path else module
    except AttributeError:
        return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def layout_of(module: nn.Module) -> AttentionLayout | None:
    """The first layout whose projections and head attributes ``module`` has (projections of any type)."""
    for layout in LAYOUTS:
        owner = _child(module, layout.owner)
        if owner is None or not all(_child(module, p) is not None for p in layout.projections().values()):
            continue
        if layout.marker is not None and not hasattr(owner, layout.marker):
            continue
        counts = [layout.head_dim, layout.num_heads, layout.kv_groups, layout.kv_heads]
        if all(_is_count(getattr(owner, attribute, None)) for attribute in counts if attribute is not None):
            return layout
    return None


@dataclass(frozen=True)
class AttentionBlock:
    """One attention block of a step's selection: its module, layout and place in the model."""

    name: str
    layout: AttentionLayout
    part: str
    layer_index: int | None
    position: str | None
    attention_kind: str | None
    module: nn.Module = field(repr=False, compare=False)

    @property
    def owner(self) -> nn.Module:
        return self.module.get_submodule(self.layout.owner) if self.layout.owner else self.module

    @property
    def num_heads(self) -> int:
        """Query heads: the layout's count attribute, or the query projection's outputs over the head width."""
        if self.layout.num_heads is not None:
            return int(getattr(self.owner, self.layout.num_heads))
        assert self.layout.query is not None
        query = self.module.get_submodule(self.layout.query)
        rows = getattr(query, "out_features", None)
        return int(rows) // self.head_dim if isinstance(rows, int) else 0

    @property
    def head_dim(self) -> int:
        return int(getattr(self.owner, self.layout.head_dim))

    @property
    def group_size(self) -> int:
        """Query heads per key-value head (1 outside grouped-query layouts)."""
        return int(getattr(self.owner, self.layout.kv_groups)) if self.layout.kv_groups is not None else 1

    @property
    def num_groups(self) -> int:
        """The units this method removes: key-value groups (heads, where each group is one head)."""
        return self.num_heads // self.group_size

    def projection(self, role: str) -> nn.Linear:
        module = self.module.get_submodule(self.layout.projections()[role])
        assert isinstance(module, nn.Linear)
        return module


def _check_block(block: AttentionBlock) -> None:
    """Every projection is a plain Linear of the size the head count, width and groups say."""
    projections = block.layout.projections()
    for path in projections.values():
        module = block.module.get_submodule(path)
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"{METHOD}: {block.name}.{path} is a {type(module).__name__}, not a Linear (an earlier step such as "
                "svd or lora replaced it); prune heads before factorizing or adapting the projections"
            )
    n, d, group = block.num_heads, block.head_dim, block.group_size
    if n < 1 or n % group:
        raise ValueError(
            f"{METHOD}: {block.name} has {n} query heads, which do not form key-value groups of {group} heads"
        )
    for role, path in projections.items():
        module = block.module.get_submodule(path)
        width = module.in_features if role == "out" else module.out_features
        heads = n // group if role in ("key", "value") else n
        expected = (3 if role == "qkv" else 1) * heads * d
        if width != expected:
            side = "inputs" if role == "out" else "outputs"
            which = f"{heads} key-value heads" if heads != n else f"{n} heads"
            raise ValueError(
                f"{METHOD}: {block.name}.{path} has {width} {side}, but the block's {which} of width {d} "
                f"need {expected}"
            )


def attention_blocks(model: nn.Module, parts: Parts, refs: Sequence[ModuleRef]) -> list[AttentionBlock]:
    """The attention blocks that hold the Linear modules of ``refs``, in order of first appearance.

    Each ref must be a projection of a block of a known layout inside its layer, and each block's
    projections must all be among ``refs``; anything else is a ``ValueError`` naming the modules.
    """
    layer_names = {part: [name for name, _ in layers] for part, layers in parts.items()}
    blocks: dict[str, AttentionBlock] = {}
    claimed: dict[str, str] = {}
    unknown = []
    for ref in refs:
        layer = None
        if ref.layer_index is not None and ref.part in layer_names:
            layer = layer_names[ref.part][ref.layer_index]
        pieces = ref.name.split(".")
        start = len(layer.split(".")) + 1 if layer else 1
        for end in range(len(pieces) - 1, start - 1, -1):
            name = ".".join(pieces[:end])
            if name in blocks:
                found = blocks[name]
            else:
                module = model.get_submodule(name)
                layout = layout_of(module)
                if layout is None:
                    continue
                found = AttentionBlock(
                    name=name,
                    layout=layout,
                    part=ref.part,
                    layer_index=ref.layer_index,
                    position=ref.position,
                    attention_kind=ref.attention_kind,
                    module=module,
                )
            local = ref.name[len(name) + 1 :]
            # A projection, or a Linear inside one that an earlier step replaced (refused by _check_block).
            if not any(local == p or local.startswith(f"{p}.") for p in found.layout.projections().values()):
                continue
            blocks.setdefault(name, found)
            claimed[ref.name] = name
            break
        else:
            unknown.append(ref.name)
    if unknown:
        raise ValueError(
            f"{METHOD}: {unknown[:4]}{' ...' if len(unknown) > 4 else ''} belong to no attention block this method "
            f"knows (layouts: {', '.join(_LAYOUT_BY_NAME)}); narrow the selection with part, position or role"
        )
    for block in blocks.values():
        _check_block(block)
        missing = [
            f"{block.name}.{p}" for p in block.layout.projections().values() if f"{block.name}.{p}" not in claimed
        ]
        if missing:
            raise ValueError(
                f"{METHOD}: the selection takes part of the attention block {block.name} but not {missing}"
            )
    return list(blocks.values())


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


def _set_heads(
    module: nn.Module,
    layout: AttentionLayout,
    num_heads: int,
    *,
    bias_heads: Sequence[int] | None = None,
    bias_width: int | None = None,
) -> None:
    """Set the block's head bookkeeping to ``num_heads`` query heads and, where the layout needs it, its forward.

    That is the head count, the all-heads width, the key-value head count (the group size stays),
    and for a block reading a shared position bias the original indices of its heads
    (``bias_heads``) and the bias's width (``bias_width``).
    """
    owner = module.get_submodule(layout.owner) if layout.owner else module
    if layout.num_heads is not None:
        setattr(owner, layout.num_heads, num_heads)
    if layout.all_head_size is not None:
        setattr(owner, layout.all_head_size, num_heads * int(getattr(owner, layout.head_dim)))
    if layout.kv_heads is not None:
        assert layout.kv_groups is not None
        setattr(owner, layout.kv_heads, num_heads // int(getattr(owner, layout.kv_groups)))
    if layout.shared_bias:
        if bias_heads is None or bias_width is None or len(bias_heads) != num_heads:
            raise ValueError(
                f"{METHOD}: a {layout.name!r} block with {num_heads} heads needs the original index of each head "
                f"in its stack's position bias, got {bias_heads!r} of {bias_width!r}"
            )
        setattr(module, BIAS_HEADS, tuple(int(h) for h in bias_heads))
        setattr(module, BIAS_WIDTH, int(bias_width))
    if layout.forward is not None:
        module.forward = functools.partial(layout.forward, layout, module)


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
    model: nn.Module, refs: list[ModuleRef], config: PruneHeadsConfig, parts: Parts
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Remove the lowest-scoring heads of every selected block in place; per-module details and a summary.

    Every block is scored and checked before any changes, so a bad setting leaves the model
    intact. Head indices are those of the block as the step finds it.
    """
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


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise FileNotFoundError(f"{folder} holds no model.safetensors (or index): cannot restore the pruned heads")


def _read_saved(folder: Path, keys: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """The saved tensors named ``keys``, and the shape of every saved tensor."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for file in _safetensors_files(folder):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
                if key in keys:
                    tensors[key] = handle.get_tensor(key)
    return tensors, shapes


def load_head_pruned(folder: str | os.PathLike[str], *, dtype: str | None = None) -> Any:
    """Read a compressed folder whose attention heads were pruned, ready for :func:`restore_pruned_heads`.

    Like :func:`vlmopt.models.load_model` on a folder, except that the saved projections smaller
    than the config's full-size attention are let through (``ignore_mismatched_sizes``) as freshly
    initialized placeholders; :func:`restore_pruned_heads` then replaces them and checks that every
    saved tensor matches the model, so no other mismatch goes unnoticed.
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
    kwargs: dict[str, Any] = {"ignore_mismatched_sizes": True}
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
