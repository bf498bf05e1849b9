"""Which variants' packed low-bit folders a study exports (``export: true``)."""

from __future__ import annotations

from typing import Any

from vlmopt.study.figures import QUANTIZERS
from vlmopt.study.runs import evaluations

__all__ = ["EXPORT_ENABLED", "exported"]

#: Whether a study exports its quantized variants' packed folders where ``export`` is left out.
EXPORT_ENABLED = False


def exported(config: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The (model, ft, variant) whose packed folder the study exports (``export: true``): each evaluated
    variant with a quantizing step (:data:`vlmopt.study.figures.QUANTIZERS`), sorted."""
    if not config.get("export", EXPORT_ENABLED):
        return []
    variants = config.get("variants") or {}
    return sorted(
        {
            (e.model, e.ft, e.variant)
            for e in evaluations(config)
            if any(step.get("method") in QUANTIZERS for step in variants.get(e.variant) or [])
        }
    )
