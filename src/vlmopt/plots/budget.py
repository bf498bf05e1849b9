"""The best variant under a budget: for a maximum size, latency or energy, the best quality per task."""

from __future__ import annotations

import pandas as pd

from vlmopt.tasks import TASKS

__all__ = ["BUDGET_COSTS", "best_under_budget"]

#: Summary columns a budget can limit (lower is cheaper), with their units.
BUDGET_COSTS = {
    "nominal_size_bytes": "bytes",
    "size_bytes": "bytes",
    "latency_ms_per_sample_p50": "ms/sample",
    "energy_j_per_sample": "J/sample",
    "gflops_per_sample": "GFLOP/sample",
    "peak_mem_mb": "MiB",
}


def best_under_budget(summary: pd.DataFrame, cost: str, limit: float) -> pd.DataFrame:
    """Per (task, dataset), the configuration with the best headline metric whose ``cost`` is at most ``limit``.

    Configurations whose cost is unknown are never within a budget. Ties go to the cheaper one,
    then by (model, ft, variant). A task with nothing within the budget keeps a row with no
    variant and ``n_within`` 0, so that the table shows that the budget is too tight for it.
    """
    if cost not in BUDGET_COSTS:
        raise ValueError(f"unknown budget cost {cost!r}; known: {sorted(BUDGET_COSTS)}")
    if cost not in summary.columns:
        raise ValueError(f"the summary has no {cost!r} column (is profiling on?)")
    rows = []
    for (task, dataset), group in summary.groupby(["task", "dataset"], sort=True):
        if task not in TASKS:
            continue
        metric = TASKS[task].headline
        within = group[group[cost].notna() & (group[cost] <= limit)]
        if metric in within.columns:
            within = within[within[metric].notna()]
        row = {"task": task, "dataset": dataset, "metric": metric, "cost": cost, "limit": limit}
        row["n_within"] = len(within)
        row["n_total"] = len(group)
        if within.empty:
            empty = dict.fromkeys(("model", "ft", "variant", "method", "value", "cost_value"))
            rows.append({**row, **empty})
            continue
        best = within.sort_values(
            [metric, cost, "model", "ft", "variant"], ascending=[False, True, True, True, True]
        ).iloc[0]
        rows.append(
            {
                **row,
                "model": best["model"],
                "ft": best["ft"],
                "variant": best["variant"],
                "method": best.get("method"),
                "value": float(best[metric]),
                "cost_value": float(best[cost]),
            }
        )
    return pd.DataFrame(rows)
