"""The one place that decides which Linear modules a compression step touches.

A model is described to the compressors as an ``nn.Module`` plus ``parts``: for each part name
(``vision``, ``bridge``, ``language``) the ordered list of its transformer layers as
``(full dotted name, layer module)``. A step selects by ``part``, by ``position`` within the
part's layer list (thirds, as in the BLIP-2 grid study: ``[0, n//3)``, ``[n//3, 2n//3)``,
``[2n//3, n)``) and by ``role`` of the Linear inside its layer (``attention``, which is
``self_attention`` plus ``cross_attention``, or ``mlp``). Each of the three may also be a list,
meaning the union (``position: [first, last]``).

Linear modules outside the listed layers (patch or token embeddings, the LM head,
``language_projection``) are never selected by ``part``/``position``/``role``; a step reaches them
only by naming them in ``modules`` (exact full names or ``re:`` patterns, fully matched), and
those named modules are added to the part selection regardless of position and role. A
selection that matches nothing raises :class:`NothingSelectedError`, never a silent no-op.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from vlmopt.parts import PARTS

__all__ = [
    "PARTS",
    "PART_CHOICES",
    "POSITIONS",
    "ROLES",
    "ModuleRef",
    "NothingSelectedError",
    "Parts",
    "SelectionSpec",
    "attention_kind_of",
    "check_parts",
    "part_of_name",
    "position_of",
    "position_range",
    "role_of",
    "select_modules",
]

#: Model parts in pipeline order; a family may leave any of them absent or empty.
PART_CHOICES = (*PARTS, "all")
POSITIONS = ("first", "middle", "last", "all")
ROLES = ("attention", "self_attention", "cross_attention", "mlp", "both")
#: Part name given to modules outside every listed layer (embeddings, heads, projections).
OTHER = "other"

Parts = Mapping[str, list[tuple[str, nn.Module]]]

# One component of a dotted name that marks an attention block: attn, attention, self_attn,
# SelfAttention, crossattention, cross_attn, encoder_attn, EncDecAttention, ...
_ATTENTION = re.compile(r"(self|cross|encoder|encdec|encoder_decoder)?_?(attn|attention)", re.IGNORECASE)
_CROSS = re.compile(r"(cross|encoder|encdec|encoder_decoder)_?(attn|attention)", re.IGNORECASE)


class NothingSelectedError(ValueError):
    """A selection setting matched no module: the step would silently change nothing."""


def role_of(local_name: str) -> str:
    """``"attention"`` if a component of the dotted name is an attention block, else ``"mlp"``.

    ``self_attn.q_proj``, ``attention.output.dense`` and ``crossattention.self.key`` are
    attention; ``mlp.fc1``, ``fc2``, ``intermediate.dense`` and ``output_query.dense`` are mlp.
    """
    return "attention" if any(_ATTENTION.fullmatch(c) for c in local_name.split(".")) else "mlp"


def attention_kind_of(local_name: str) -> str | None:
    """``"cross"`` or ``"self"`` for attention modules, ``None`` for mlp modules."""
    if role_of(local_name) != "attention":
        return None
    return "cross" if any(_CROSS.fullmatch(c) for c in local_name.split(".")) else "self"


def position_range(position: str, n: int) -> range:
    """Layer indices of ``position`` in a part of ``n`` layers (thirds: ``n//3`` and ``2n//3``)."""
    bounds = {"first": (0, n // 3), "middle": (n // 3, 2 * n // 3), "last": (2 * n // 3, n), "all": (0, n)}
    if position not in bounds:
        raise ValueError(f"position={position!r} is not allowed; choose one of {', '.join(POSITIONS)}")
    return range(*bounds[position])


def position_of(index: int, n: int) -> str:
    """Which third (``first``, ``middle``, ``last``) layer ``index`` of ``n`` falls in."""
    if not 0 <= index < n:
        raise IndexError(f"layer index {index} outside a part of {n} layers")
    if index < n // 3:
        return "first"
    return "middle" if index < 2 * n // 3 else "last"


@dataclass(frozen=True)
class ModuleRef:
    """One selected Linear module and where it sits in the model."""

    name: str
    part: str
    layer_index: int | None
    position: str | None
    role: str
    attention_kind: str | None
    module: nn.Linear = field(repr=False, compare=False)

    def record(self) -> dict[str, Any]:
        """JSON-ready description (everything but the module itself)."""
        return {
            "name": self.name,
            "part": self.part,
            "layer_index": self.layer_index,
            "position": self.position,
            "role": self.role,
            "attention_kind": self.attention_kind,
        }


def check_parts(model: nn.Module, parts: Parts) -> None:
    """Reject unknown part names and layers that are not where their name says in ``model``."""
    for part, layers in parts.items():
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; parts are {', '.join(PARTS)}")
        for name, layer in layers:
            try:
                found = model.get_submodule(name)
            except AttributeError as err:
                raise ValueError(f"part {part!r} lists layer {name!r}, which the model does not have") from err
            if found is not layer:
                raise ValueError(f"part {part!r} lists layer {name!r}, but that name holds another module")


def part_of_name(name: str, parts: Parts) -> tuple[str, int | None]:
    """The part and layer index that contain the dotted ``name``, or (``"other"``, None)."""
    for part, layers in parts.items():
        for index, (layer_name, _) in enumerate(layers):
            if name == layer_name or name.startswith(layer_name + "."):
                return part, index
    return OTHER, None


def _layer_linears(layer: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(local, m) for local, m in layer.named_modules() if local and isinstance(m, nn.Linear)]


def _describe_parts(parts: Parts) -> str:
    lines = []
    for part in PARTS:
        layers = parts.get(part) or []
        if not layers:
            lines.append(f"{part}: absent")
            continue
        n = len(layers)
        thirds = ", ".join(f"{p} {len(position_range(p, n))}" for p in POSITIONS[:3])
        roles = {"attention": 0, "mlp": 0}
        for _, layer in layers:
            for local, _m in _layer_linears(layer):
                roles[role_of(local)] += 1
        lines.append(
            f"{part}: {n} layers ({thirds}); Linear modules: attention {roles['attention']}, mlp {roles['mlp']}"
        )
    return "; ".join(lines)


def _match_name(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name


def _choices(key: str, value: str | Sequence[str], allowed: tuple[str, ...]) -> tuple[str, ...]:
    """``value`` (one choice or a list of them) as a tuple, each checked against ``allowed``."""
    values = (value,) if isinstance(value, str) else tuple(value)
    if not values:
        raise ValueError(f"{key}=[] selects nothing; choose one or more of {', '.join(allowed)}")
    for v in values:
        if not isinstance(v, str) or v not in allowed:
            raise ValueError(f"{key}={v!r} is not allowed; choose one or more of {', '.join(allowed)}")
    return values


def _role_matches(wanted: tuple[str, ...], role: str, attention_kind: str | None) -> bool:
    for w in wanted:
        if w == "both" or w == role or (role == "attention" and w == f"{attention_kind}_attention"):
            return True
    return False


def select_modules(
    model: nn.Module,
    parts: Parts,
    *,
    part: str | Sequence[str],
    position: str | Sequence[str] = "all",
    role: str | Sequence[str] = "both",
    modules: Iterable[str] = (),
) -> list[ModuleRef]:
    """Linear modules in the layers of ``part`` at ``position`` with ``role``, plus named ``modules``.

    ``part``, ``position`` and ``role`` are each one choice or a list of choices (their union).
    Order: parts in pipeline order, layers in list order, modules in definition order, then the
    explicitly named modules outside that selection in model order. Raises
    :class:`NothingSelectedError` if the part selection is empty or a ``modules`` entry matches no
    Linear module.
    """
    part_values = _choices("part", part, PART_CHOICES)
    position_values = _choices("position", position, POSITIONS)
    role_values = _choices("role", role, ROLES)
    check_parts(model, parts)

    selected: list[ModuleRef] = []
    wanted_parts = PARTS if "all" in part_values else part_values
    for part_name in (p for p in PARTS if p in wanted_parts):
        layers = parts.get(part_name) or []
        n = len(layers)
        indices = sorted({i for p in position_values for i in position_range(p, n)})
        for index in indices:
            layer_name, layer = layers[index]
            for local, linear in _layer_linears(layer):
                module_role = role_of(local)
                if not _role_matches(role_values, module_role, attention_kind_of(local)):
                    continue
                selected.append(
                    ModuleRef(
                        name=f"{layer_name}.{local}",
                        part=part_name,
                        layer_index=index,
                        position=position_of(index, n),
                        role=module_role,
                        attention_kind=attention_kind_of(local),
                        module=linear,
                    )
                )
    if not selected:
        raise NothingSelectedError(
            f"no Linear module matches part={_show(part_values)}, position={_show(position_values)}, "
            f"role={_show(role_values)}; "
            f"the model has {_describe_parts(parts)}"
        )

    patterns = list(modules)
    if patterns:
        taken = {ref.name for ref in selected}
        matched = dict.fromkeys(patterns, 0)
        for name, linear in model.named_modules():
            if not isinstance(linear, nn.Linear):
                continue
            hits = [p for p in patterns if _match_name(p, name)]
            for p in hits:
                matched[p] += 1
            if not hits or name in taken:
                continue
            owner, index = part_of_name(name, parts)
            if index is None:
                local, layer_position = name, None
            else:
                local = name[len(parts[owner][index][0]) + 1 :]
                layer_position = position_of(index, len(parts[owner]))
            selected.append(
                ModuleRef(
                    name=name,
                    part=owner,
                    layer_index=index,
                    position=layer_position,
                    role=role_of(local),
                    attention_kind=attention_kind_of(local),
                    module=linear,
                )
            )
            taken.add(name)
        missing = [p for p, count in matched.items() if count == 0]
        if missing:
            raise NothingSelectedError(f"modules entries {missing} match no Linear module in the model")
    return selected


@dataclass(frozen=True, kw_only=True)
class SelectionSpec:
    """Selection settings shared by every method; method configs extend this dataclass.

    Configs are built with :meth:`from_dict`, which rejects unknown keys by name, and validate
    their values on construction, so a typo in a study file fails instead of doing nothing.
    """

    method: ClassVar[str] = ""

    part: str | tuple[str, ...]
    position: str | tuple[str, ...] = "all"
    role: str | tuple[str, ...] = "both"
    modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _choice(self, "part", PART_CHOICES)
        _choice(self, "position", POSITIONS)
        _choice(self, "role", ROLES)
        if isinstance(self.modules, str) or not all(isinstance(m, str) for m in self.modules):
            raise ValueError(f"{self._label()}modules must be a list of module names or 're:' patterns")
        object.__setattr__(self, "modules", tuple(self.modules))
        for pattern in self.modules:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    raise ValueError(f"{self._label()}modules entry {pattern!r} is not a valid regex: {err}") from err

    @classmethod
    def allowed_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> SelectionSpec:
        """Build the config from a step's settings (without ``method``), naming any unknown key."""
        allowed = cls.allowed_keys()
        unknown = [k for k in settings if k not in allowed]
        if unknown:
            raise ValueError(
                f"unknown setting(s) {', '.join(map(repr, unknown))} for method {cls.method!r}; "
                f"allowed: {', '.join(allowed)}"
            )
        required = [f.name for f in dataclasses.fields(cls) if _is_required(f) and f.name not in settings]
        if required:
            raise ValueError(f"method {cls.method!r} needs setting(s) {', '.join(map(repr, required))}")
        return cls(**settings)

    def to_dict(self) -> dict[str, Any]:
        """Full settings after defaults, JSON-ready, with ``method`` first."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def select(self, model: nn.Module, parts: Parts) -> list[ModuleRef]:
        try:
            return select_modules(
                model, parts, part=self.part, position=self.position, role=self.role, modules=self.modules
            )
        except NothingSelectedError as err:
            raise NothingSelectedError(f"{self._label()}{err}") from None

    def _label(self) -> str:
        return f"{self.method}: " if self.method else ""


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _show(values: tuple[str, ...]) -> str:
    return repr(values[0]) if len(values) == 1 else repr(list(values))


def _choice(config: SelectionSpec, key: str, allowed: tuple[str, ...]) -> None:
    """Check one selector (a choice or a list of choices); lists are stored as tuples."""
    value = getattr(config, key)
    try:
        values = _choices(key, value, allowed)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{config._label()}{err}") from None
    if not isinstance(value, str):
        object.__setattr__(config, key, values)
