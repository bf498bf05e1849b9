"""Profiling sweeps (:mod:`vlmopt.profiling.sweep` measures them): their axes and points.

Defined here, beside the rest of the study's planning, so that planning a study never imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ATTENTION", "AXES", "DTYPE_NAMES", "NUMERIC_AXES", "SweepPoint", "sweep_points"]

#: Sweep axes and what each one changes.
AXES: dict[str, str] = {
    "image_size": "longest image side handed to the processor (pixels, aspect kept)",
    "prompt_length": "text tokens of each prompt (filler words before the task's prompt)",
    "batch_size": "samples per timed call",
    "dtype": "floating-point type of the weights and activations",
    "attn_implementation": "attention kernels of the model's parts",
    "compile": "torch.compile of each transformer layer",
}
#: The axes whose values are numbers (drawn as curves; the others as bars).
NUMERIC_AXES = ("image_size", "prompt_length", "batch_size")
DTYPE_NAMES = ("float32", "float16", "bfloat16")
ATTENTION = ("eager", "sdpa", "flash_attention_2")


@dataclass(frozen=True)
class SweepPoint:
    """One value of one sweep axis."""

    axis: str
    value: Any

    def __post_init__(self) -> None:
        if self.axis not in AXES:
            raise ValueError(f"unknown profiling sweep axis {self.axis!r}; known: {sorted(AXES)}")
        allowed: tuple[Any, ...] | None = None
        if self.axis in NUMERIC_AXES:
            if isinstance(self.value, bool) or not isinstance(self.value, int) or self.value < 1:
                raise ValueError(f"profiling.sweep.{self.axis}: {self.value!r} is not a positive integer")
        elif self.axis == "dtype":
            allowed = DTYPE_NAMES
        elif self.axis == "attn_implementation":
            allowed = ATTENTION
        elif self.axis == "compile":
            allowed = (False, True)
        if allowed is not None and (self.value not in allowed or type(self.value) is not type(allowed[0])):
            raise ValueError(f"profiling.sweep.{self.axis}: {self.value!r} is not one of {list(allowed)}")

    @property
    def slug(self) -> str:
        """File-name form: ``batch_size-4``, ``dtype-bfloat16``, ``compile-true``."""
        value = str(self.value).lower() if isinstance(self.value, bool) else str(self.value)
        return f"{self.axis}-{value}"

    @property
    def text(self) -> str:
        """The value as the efficiency table's ``sweep_value`` column holds it."""
        return str(self.value).lower() if isinstance(self.value, bool) else str(self.value)


def sweep_points(sweep: Mapping[str, Any] | None) -> list[SweepPoint]:
    """The points of a ``profiling.sweep`` mapping (axis -> list of values), in axis then value order."""
    points: list[SweepPoint] = []
    for axis, values in (sweep or {}).items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"profiling.sweep.{axis}: expected a non-empty list of values, got {values!r}")
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"profiling.sweep.{axis}: {values} repeats a value")
        points += [SweepPoint(axis, v) for v in values]
    return points
