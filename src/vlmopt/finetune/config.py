"""Settings of a finetuning run, apart from the training code (a compression step that trains
validates them without loading it)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

__all__ = ["FullFinetuneConfig"]


@dataclass(frozen=True)
class FullFinetuneConfig:
    """Settings of a full finetuning run; unknown keys are rejected by :meth:`from_dict`."""

    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 16
    weight_decay: float = 0.0
    #: Tasks whose examples are trained on; None: the family's (``adapter.train_tasks``, else its tasks).
    tasks: tuple[str, ...] | None = None
    seed: int = 0
    checkpoint_every: int = 200
    warmup_steps: int = 50
    max_steps: int | None = None

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> FullFinetuneConfig:
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - allowed)
        if unknown:
            raise ValueError(f"unknown finetune setting(s) {unknown}; allowed: {sorted(allowed)}")
        values = dict(settings)
        if values.get("tasks") is not None:
            if isinstance(values["tasks"], str) or not all(isinstance(t, str) and t for t in values["tasks"]):
                raise ValueError(f"finetune setting tasks must be a list of task names, got {values['tasks']!r}")
            values["tasks"] = tuple(values["tasks"])
        config = cls(**values)
        for name in ("epochs", "batch_size", "checkpoint_every", "warmup_steps"):
            if getattr(config, name) < 1:
                raise ValueError(f"finetune setting {name} must be at least 1, got {getattr(config, name)}")
        if config.lr <= 0:
            raise ValueError(f"finetune setting lr must be positive, got {config.lr}")
        return config
