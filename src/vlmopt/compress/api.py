"""``compress(loaded, steps, calibration=None) -> Manifest``: the one call for users and notebooks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vlmopt.compress.calibration import Calibration
from vlmopt.compress.lora import TrainingData
from vlmopt.compress.variant import apply_variant

__all__ = ["Manifest", "compress"]


@dataclass(frozen=True)
class Manifest:
    """What a variant changed: ``changed`` lists every changed module (``name``, part, role, bits, ...).

    ``data`` is the full manifest dict as written to ``manifest.json``.
    """

    data: dict[str, Any]

    @property
    def changed(self) -> list[dict[str, Any]]:
        return list(self.data["changed_modules"])

    @property
    def steps(self) -> list[dict[str, Any]]:
        return list(self.data["steps"])

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


def compress(
    loaded: Any,
    steps: list[Mapping[str, Any]],
    calibration: Calibration | None = None,
    *,
    training: Callable[[dict[str, Any]], TrainingData] | None = None,
) -> Manifest:
    """Apply ``steps`` to ``loaded.model`` in place (runtime steps included) and return the manifest.

    ``loaded`` is a :class:`~vlmopt.models.base.LoadedModel`; ``calibration`` (batches from
    :func:`vlmopt.tasks.encode.calibration_batches`) serves GPTQ and AWQ steps, ``training`` (a
    function from ``{dataset, split}`` to :class:`~vlmopt.compress.lora.TrainingData`) serves LoRA
    steps. To save the result with its manifest, use :func:`vlmopt.pipeline.compress_model` (or
    ``vlmopt compress``), which handles runtime steps, factorized layers and kept adapters on reload.
    """
    return Manifest(apply_variant(loaded.model, loaded.parts(), steps, calibration=calibration, training=training))
