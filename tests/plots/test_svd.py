"""The SVD study's grid (quality by ratio kept and layers factorized) and its heat-map and lines figure."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from vlmopt.plots.style import plt
from vlmopt.plots.svd import quality_vs_svd, svd_figure, svd_grid

RATIOS = (0.25, 0.5, 0.75)
LAYERS = (2, 4)
MISSING = (4, 0.5)  # never evaluated: its heat-map cell must stay blank


def _top1(n: int, ratio: float) -> float:
    return 60.0 - n * (1 - ratio) * 10


def _tables(captioning: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A 3 ratios x 2 layer-counts SVD grid (one cell missing) of one CLIP model, its baseline, a
    quantized variant, and an SVD step after layer pruning (not an SVD-only variant)."""
    summary = [
        {"variant": "baseline", "top1": 60.0, "top5": 80.0, "method": "none"},
        {"variant": "w4", "top1": 59.0, "top5": 79.0, "method": "uniform"},
        {"variant": "prune-svd", "top1": 10.0, "top5": 20.0, "method": "prune_layers+svd"},
    ]
    steps = [
        {"variant": "baseline", "step": -1, "method": "none", "n_layers": 0},
        {"variant": "w4", "step": 0, "method": "uniform", "part": "vision", "bits": 4, "n_layers": 12},
        {"variant": "prune-svd", "step": 0, "method": "prune_layers", "part": "vision", "n_layers": 2},
        {
            "variant": "prune-svd",
            "step": 1,
            "method": "svd",
            "part": "vision",
            "role": "attention",
            "ratio": 0.5,
            "n_layers": 2,
        },
    ]
    for n in LAYERS:
        for ratio in RATIOS:
            if (n, ratio) == MISSING:
                continue
            name = f"svd-n{n}-r{ratio}"
            summary.append({"variant": name, "top1": _top1(n, ratio), "top5": _top1(n, ratio) + 20, "method": "svd"})
            steps.append(
                {
                    "variant": name,
                    "step": 0,
                    "method": "svd",
                    "part": "vision",
                    "position": "first",
                    "role": "attention",
                    "ratio": ratio,
                    "n_layers": n,
                }
            )
    summary = pd.DataFrame(summary).assign(model="clip", ft="none", task="classification", dataset="d")
    if captioning:
        text = summary.drop(columns=["top1", "top5"]).assign(task="captioning", dataset="caps", CIDEr=1.5)
        summary = pd.concat([summary, text], ignore_index=True)
    variants = pd.DataFrame(steps).assign(model="clip", ft="none")
    return summary, variants


def _axes(fig: plt.Figure, label: str) -> list[plt.Axes]:
    return [ax for ax in fig.axes if ax.get_label() == label]


def test_grid_keeps_only_single_step_svd_variants():
    summary, variants = _tables(captioning=True)
    grid = svd_grid(summary, variants)
    assert list(grid.columns) == [
        "model",
        "ft",
        "task",
        "dataset",
        "part",
        "role",
        "position",
        "variant",
        "ratio",
        "n_layers",
        "metric",
        "value",
        "top5",
    ]
    assert len(grid) == 10  # 5 grid cells x 2 tasks; baseline, w4 and prune-svd left out
    assert not {"baseline", "w4", "prune-svd"} & set(grid["variant"])
    cls = grid[grid["task"] == "classification"]
    expected = {(r, float(n), _top1(n, r)) for n in LAYERS for r in RATIOS if (n, r) != MISSING}
    assert set(zip(cls["ratio"], cls["n_layers"], cls["value"], strict=True)) == expected
    assert set(cls["metric"]) == {"top1"}
    assert (cls["top5"] == cls["value"] + 20).all()
    caps = grid[grid["task"] == "captioning"]
    assert set(caps["metric"]) == {"CIDEr"} and (caps["value"] == 1.5).all() and caps["top5"].isna().all()
    assert set(grid["part"]) == {"vision"} and set(grid["role"]) == {"attention"}


def test_grid_without_top5_or_n_layers_columns():
    summary, variants = _tables()
    grid = svd_grid(summary.drop(columns="top5"), variants.drop(columns="n_layers"))
    assert "top5" not in grid.columns
    assert len(grid) == 5 and grid["n_layers"].isna().all()


def test_heat_maps_hold_the_grid_with_a_blank_missing_cell():
    summary, variants = _tables()
    fig = svd_figure(summary, variants)
    try:
        (heat,) = _axes(fig, "svd-heatmap")
        (heat5,) = _axes(fig, "svd-heatmap-top5")
        values = np.ma.filled(heat.images[0].get_array().astype(float), np.nan)
        expected = np.array([[_top1(n, r) if (n, r) != MISSING else np.nan for r in RATIOS] for n in LAYERS])
        np.testing.assert_allclose(values, expected)  # rows 2, 4 layers; columns ratios ascending; NaN kept
        top5 = np.ma.filled(heat5.images[0].get_array().astype(float), np.nan)
        np.testing.assert_allclose(top5, expected + 20)
        assert len(heat.texts) == 5 and len(heat5.texts) == 5  # one annotation per evaluated cell
        assert sorted(t.get_text() for t in heat.texts) == sorted(f"{v:.1f}" for v in expected.ravel() if v == v)
        assert [t.get_text() for t in heat.get_yticklabels()] == ["2", "4"]
        assert [t.get_text() for t in heat.get_xticklabels()] == ["0.25", "0.5", "0.75"]
        assert heat.get_xlabel() == "ratio of parameters kept" and heat.get_ylabel() == "layers factorized"
        assert "baseline 60.0" in heat.get_title()
        (row,) = fig.subfigs
        assert row.get_suptitle() == "clip / none / classification (d): SVD of vision attention"
        assert len(fig.axes) == 5  # two heat maps, their colour bars, the lines panel
    finally:
        plt.close(fig)


def test_lines_one_per_layer_count_and_the_baseline():
    summary, variants = _tables()
    fig = svd_figure(summary, variants)
    try:
        (ax,) = _axes(fig, "svd-lines")
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert sorted(lines) == ["2", "4", "baseline"]
        np.testing.assert_allclose(lines["2"].get_xdata(), RATIOS)
        np.testing.assert_allclose(lines["2"].get_ydata(), [_top1(2, r) for r in RATIOS])
        np.testing.assert_allclose(lines["4"].get_xdata(), [0.25, 0.75])  # the missing cell is not drawn
        assert set(lines["baseline"].get_ydata()) == {60.0}
        assert lines["baseline"].get_linestyle() == "--"
        assert lines["2"].get_color() != lines["4"].get_color()
        assert ax.get_xlabel() == "ratio of parameters kept" and ax.get_ylabel() == "top-1 accuracy (%)"
    finally:
        plt.close(fig)


def test_a_row_per_task_and_selection_split_by_position_on_collision():
    summary, variants = _tables(captioning=True)
    # The same grid again for the MLP, and the attention grid repeated in the last third of the layers.
    mlp = variants[variants["variant"].str.startswith("svd-")].assign(role="mlp")
    last = variants[variants["variant"].str.startswith("svd-")].assign(position="last")
    mlp["variant"] += "-mlp"
    last["variant"] += "-last"
    svd = summary[summary["variant"].str.startswith("svd-")]
    summary = pd.concat(
        [summary, svd.assign(variant=svd["variant"] + "-mlp"), svd.assign(variant=svd["variant"] + "-last")]
    )
    fig = svd_figure(summary, pd.concat([variants, mlp, last], ignore_index=True))
    try:
        titles = [row.get_suptitle() for row in fig.subfigs]
        assert titles == [
            "clip / none / captioning (caps): SVD of vision attention (first)",
            "clip / none / captioning (caps): SVD of vision attention (last)",
            "clip / none / captioning (caps): SVD of vision mlp",
            "clip / none / classification (d): SVD of vision attention (first)",
            "clip / none / classification (d): SVD of vision attention (last)",
            "clip / none / classification (d): SVD of vision mlp",
        ]
        assert len(_axes(fig, "svd-heatmap")) == 6 and len(_axes(fig, "svd-heatmap-top5")) == 3
        captions = [ax for ax in _axes(fig, "svd-lines") if ax.get_ylabel() == "CIDEr"]
        assert len(captions) == 3 and all(len(ax.get_lines()) == 3 for ax in captions)  # 2 layer counts + baseline
        assert all(set(ax.get_lines()[-1].get_ydata()) == {1.5} for ax in captions)
    finally:
        plt.close(fig)


def test_png_is_written(tmp_path):
    summary, variants = _tables()
    out = quality_vs_svd(summary, variants, tmp_path / "svd.png")
    assert out == tmp_path / "svd.png"
    image = mpimg.imread(out)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 600


def test_nothing_to_draw_without_svd_variants(tmp_path):
    summary, variants = _tables()
    keep = ~variants["variant"].str.startswith("svd-")
    with pytest.raises(ValueError, match="no SVD variants"):
        svd_figure(summary, variants[keep])
    with pytest.raises(ValueError, match="no SVD variants"):
        quality_vs_svd(summary, variants[keep], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
