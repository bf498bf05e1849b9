"""What every compression method's handler receives besides the model, and what it returns.

A handler is ``handler(model, refs, config, inputs) -> (details, summary)``: it changes the
selected modules ``refs`` of ``model`` in place as ``config`` says, reading whatever it needs from
``inputs`` (:class:`StepInputs`), and returns per-module details (by module name) for the manifest
and, for methods that change the model's structure, a step summary (else None).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmopt.compress.calibration import Calibration
    from vlmopt.compress.lora import TrainingData
    from vlmopt.compress.select import Parts

__all__ = ["StepInputs", "StepResult", "StepWork"]

#: Per-module details by module name, and the step summary of structural methods (None otherwise).
StepResult = tuple[dict[str, dict[str, Any]], dict[str, Any] | None]


@dataclass(frozen=True)
class StepWork:
    """Where a long step keeps its progress between runs of its job, and what determines that progress.

    ``folder`` is the step's own (``<work_dir>/step-<index>``), kept when the job is killed and
    removed once the variant is saved; ``inputs`` (JSON values: the base model's digest, the data
    digests, the code digest and the steps up to this one) fingerprint a checkpoint kept there
    (:mod:`vlmopt.checkpoints`), so a rerun with other inputs never resumes it.
    """

    folder: Path
    inputs: dict[str, Any]


@dataclass(frozen=True)
class StepInputs:
    """The model's parts (as they are before the step), the data of calibrated and trained methods,
    and, where the caller keeps one, the step's work folder (:class:`StepWork`; None: nothing resumes)."""

    parts: Parts
    calibration: Calibration | None = None
    training: TrainingData | None = None
    work: StepWork | None = None

    def need_calibration(self, method: str) -> Calibration:
        if self.calibration is None:
            raise ValueError(f"{method} needs calibration data, and none was given")
        return self.calibration

    def need_training(self, method: str) -> TrainingData:
        if self.training is None:
            raise ValueError(f"{method} trains on a dataset, and none was given")
        return self.training
