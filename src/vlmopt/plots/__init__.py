"""Figures from result tables only (never from models): static PNGs with matplotlib."""

from __future__ import annotations

from vlmopt.plots.static import quality_vs_size, task_bars
from vlmopt.plots.tradeoffs import COSTS, pareto_front, quality_vs_cost

__all__ = ["COSTS", "pareto_front", "quality_vs_cost", "quality_vs_size", "task_bars"]
