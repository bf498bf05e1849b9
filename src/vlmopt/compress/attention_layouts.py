"""Where each architecture's attention keeps its projections and head counts, and how a head-pruned block runs.

:class:`AttentionLayout` describes one attention implementation: which child modules are the
query, key and value projections (or a fused ``qkv``) and the output projection, and which
attributes hold the head count and width. :data:`LAYOUTS` lists the known ones, one table row per
architecture, and :func:`layout_of` finds a module's. ``_set_heads`` writes the head bookkeeping of
a block whose heads were pruned and, where the stock forward cannot run with fewer heads, installs
the layout's replacement forward: ``_fused_qkv_forward`` for the BLIP and BLIP-2 ViT, and
``_shared_bias_forward`` for T5-style blocks that read a relative position bias shared along their
stack (see :mod:`vlmopt.compress.prune_heads`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["LAYOUTS", "AttentionLayout", "layout_of"]

#: The method these layouts serve (:mod:`vlmopt.compress.prune_heads`); its name starts every error.
METHOD = "prune_heads"

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
    read a relative position bias shared along its stack (see :mod:`vlmopt.compress.prune_heads`). ``forward``,
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
