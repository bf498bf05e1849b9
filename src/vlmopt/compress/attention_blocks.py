"""The attention blocks of a ``prune_heads`` selection, each found from its projections and checked.

:func:`attention_blocks` maps the selected Linear modules to the attention blocks that hold them
(:class:`AttentionBlock`: the block's module, its layout from
:mod:`vlmopt.compress.attention_layouts`, and its place in the model), and refuses a module outside
every known block, a block selected only in part, and a projection that is not a plain Linear of
the size the block's head count and width say.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from vlmopt.compress.attention_layouts import _LAYOUT_BY_NAME, METHOD, AttentionLayout, layout_of
from vlmopt.compress.select import ModuleRef, Parts

__all__ = ["AttentionBlock", "attention_blocks"]


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
