"""Figures from result tables only (never from models): static PNGs with matplotlib."""

from __future__ import annotations

from vlmopt.plots.static import MAIN_METRIC, quality_vs_size, task_bars

__all__ = ["MAIN_METRIC", "quality_vs_size", "task_bars"]
