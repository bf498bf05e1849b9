"""The Pareto front of quality against cost, and the quality-versus-cost figure."""

from __future__ import annotations

import math

import matplotlib.colors
import matplotlib.image as mpimg
import matplotlib.text
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


def test_every_variant_labelled_coloured_by_method_baseline_ringed_and_simulated_variants_pale():
    from vlmopt.plots.style import method_colour
    from vlmopt.plots.tradeoffs import cost_figure

    summary = _summary(False).assign(simulated=[False, True, False], ft="full", method=["none", "uniform", "svd"])
    fig = cost_figure(summary)
    ax = fig.axes[0]  # captioning against latency: w4 (9 ms, 0.8) and baseline (10 ms, 1.0) are the front
    assert sorted(t.get_text() for t in ax.texts) == ["bad", "baseline", "w4"]
    points = {c.get_label(): c for c in ax.collections if not c.get_label().startswith("_")}
    assert set(points) == {"m/full/baseline", "m/full/w4", "m/full/bad"}
    # Simulated: pale and dashed; really compressed and dense variants: opaque, solid.
    assert [tuple(points[f"m/full/{v}"].get_facecolor()[0][:3]) for v in ("baseline", "w4", "bad")] == [
        matplotlib.colors.to_rgb(method_colour(m)) for m in ("none", "uniform", "svd")
    ]
    assert points["m/full/w4"].get_alpha() == 0.45 and points["m/full/w4"].get_linestyle()[0][1] is not None
    assert points["m/full/bad"].get_alpha() == 1.0 and points["m/full/bad"].get_linestyle()[0][1] is None
    # One black ring, around the baseline's point.
    rings = [c for c in ax.collections if c.get_label() == "_baseline"]
    assert len(rings) == 1 and rings[0].get_offsets().tolist() == [[10.0, 1.0]]


def _boxes(ax):
    """The text boxes of the axes' labels (without their leader lines)."""
    ax.figure.canvas.draw()
    renderer = ax.figure.canvas.get_renderer()
    return [matplotlib.text.Text.get_window_extent(t, renderer) for t in ax.texts]


def test_labels_do_not_overlap_and_fall_back_to_the_front():
    from vlmopt.plots.labels import label_points
    from vlmopt.plots.style import plt

    rng = np.random.default_rng(1)
    x, y = rng.random(30), rng.random(30)
    names = [f"variant-{i}" for i in range(30)]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(x, y)
    counts = label_points(ax, x, y, names)
    boxes = _boxes(ax)
    # Every name drawn once (two points closer than a marker would share a label).
    shown = [name for t in ax.texts for name in t.get_text().split("\n")]
    assert counts == {"placed": 30, "left_out": 0} and sorted(shown) == sorted(names)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    frame = ax.get_window_extent()
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    plt.close(fig)

    # Points whose markers overlap share one label, a line per name.
    fig, ax = plt.subplots()
    ax.scatter([1, 1, 2], [1, 1, 2])
    assert label_points(ax, [1, 1, 2], [1, 1, 2], ["a", "b", "c"]) == {"placed": 3, "left_out": 0}
    assert sorted(t.get_text() for t in ax.texts) == ["a\nb", "c"]
    plt.close(fig)

    # Past max_labels points, only the priority points (the front) are labelled.
    fig, ax = plt.subplots()
    ax.scatter(x, y)
    front = pareto_front(x, y)
    counts = label_points(ax, x, y, names, priority=front, max_labels=10)
    assert counts["placed"] == front.sum() and sorted(t.get_text() for t in ax.texts) == sorted(np.array(names)[front])
    plt.close(fig)


def test_a_task_without_values_of_a_cost_says_not_measured():
    from vlmopt.plots.tradeoffs import cost_figure

    summary = pd.concat(
        [_summary(False), pd.DataFrame([{"model": "m", "ft": "none", "variant": "baseline", "task": "vqa"}])]
    ).assign(vqa_accuracy=[None, None, None, 50.0])
    fig = cost_figure(summary, costs=["nominal_size_bytes"])
    captioning, vqa = fig.axes[:2]
    assert [t.get_text() for t in vqa.texts] == ["not measured"] and vqa.get_xticks().size == 0
    assert "not measured" not in [t.get_text() for t in captioning.texts]


def test_layout_wraps_one_cost_and_turns_many_tasks_into_rows():
    from vlmopt.plots.tradeoffs import cost_figure

    tasks = {"captioning": "CIDEr", "vqa": "vqa_accuracy", "retrieval": "r_mean", "classification": "top1"}
    summary = pd.concat([_summary(False).assign(task=t, **{m: [1.0, 0.8, 0.5]}) for t, m in tasks.items()])
    # One cost: four tasks wrap three to a row (the fifth and sixth slots hidden).
    fig = cost_figure(summary, costs=["nominal_size_bytes"])
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == list(tasks) and len(fig.axes) == 6
    assert fig.axes[0].get_subplotspec().get_geometry()[:2] == (2, 3)
    # Three costs and four tasks: a row per task, a column per cost.
    fig = cost_figure(summary)
    assert fig.axes[0].get_subplotspec().get_geometry()[:2] == (4, 3)
    assert [ax.get_xlabel() for ax in fig.axes[:3]] == [
        "latency per sample (ms, median)",
        "nominal size (MB, weights at their bit width)",
        "GFLOP per sample",
    ]
    assert [fig.axes[3 * i].get_title() for i in range(4)] == list(tasks)
