"""The Pareto front of quality against cost, and the quality-versus-cost figure."""

from __future__ import annotations

import math

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from vlmopt.plots import pareto_front, quality_vs_cost


def test_front_keeps_exactly_the_undominated_points():
    #        cheap+bad  dominated  mid       dominated by (4, 0.9)   best+costly  missing
    cost = [1.0, 2.0, 3.0, 5.0, 4.0, 6.0, math.nan]
    quality = [0.1, 0.05, 0.6, 0.8, 0.9, 0.95, 1.0]
    assert pareto_front(cost, quality).tolist() == [True, False, True, False, True, True, False]


def test_ties_and_brute_force_agreement():
    assert pareto_front([1, 1], [0.5, 0.5]).tolist() == [True, True]  # equal points: neither beats the other
    assert pareto_front([1, 1], [0.5, 0.4]).tolist() == [True, False]  # same cost, less quality
    rng = np.random.default_rng(0)
    x, y = rng.random(60), rng.random(60)
    expected = [
        not any(x[j] <= x[i] and y[j] >= y[i] and (x[j] < x[i] or y[j] > y[i]) for j in range(60)) for i in range(60)
    ]
    assert pareto_front(x, y).tolist() == expected
    with pytest.raises(ValueError, match="differ in length"):
        pareto_front([1, 2], [1])


def _summary(with_energy: bool) -> pd.DataFrame:
    rows = []
    for variant, (latency, size, cider) in {
        "baseline": (10, 4e6, 1.0),
        "w4": (9, 1e6, 0.8),
        "bad": (12, 4e6, 0.5),
    }.items():
        rows.append(
            {
                "model": "m",
                "ft": "none",
                "variant": variant,
                "task": "captioning",
                "dataset": "d",
                "CIDEr": cider,
                "latency_ms_per_sample_p50": latency,
                "nominal_size_bytes": size,
                "gflops_per_sample": 2.0,
                "energy_j_per_sample": 0.5 if with_energy else None,
            }
        )
    return pd.DataFrame(rows)


def test_figure_has_a_row_per_measured_cost(tmp_path):
    without = mpimg.imread(quality_vs_cost(_summary(False), tmp_path / "a.png"))
    with_energy = mpimg.imread(quality_vs_cost(_summary(True), tmp_path / "b.png"))
    # Energy measured: one more row of panels (taller figure); none measured: no empty energy panel.
    assert with_energy.shape[0] > without.shape[0] * 1.2
    with pytest.raises(ValueError, match="none of the cost columns"):
        quality_vs_cost(
            _summary(False).drop(columns=["latency_ms_per_sample_p50", "nominal_size_bytes", "gflops_per_sample"]),
            tmp_path / "c.png",
        )


def test_front_is_labelled_baseline_ringed_and_simulated_variants_pale():
    from vlmopt.plots.tradeoffs import cost_figure

    summary = _summary(False).assign(simulated=[False, True, False])
    fig = cost_figure(summary)
    ax = fig.axes[0]  # captioning against latency: w4 (9 ms, 0.8) and baseline (10 ms, 1.0) are the front
    assert sorted(t.get_text() for t in ax.texts) == ["baseline", "w4"]
    points = {c.get_label(): c for c in ax.collections if not c.get_label().startswith("_")}
    assert set(points) == {"m/none/baseline", "m/none/w4", "m/none/bad"}
    # Simulated: pale and dashed; really compressed and dense variants: opaque, solid.
    assert points["m/none/w4"].get_alpha() == 0.45 and points["m/none/w4"].get_linestyle()[0][1] is not None
    assert points["m/none/bad"].get_alpha() == 1.0 and points["m/none/bad"].get_linestyle()[0][1] is None
    # One black ring, around the baseline's point.
    rings = [c for c in ax.collections if c.get_label() == "_baseline"]
    assert len(rings) == 1 and rings[0].get_offsets().tolist() == [[10.0, 1.0]]
