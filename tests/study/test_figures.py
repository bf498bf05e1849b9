"""The table of figures: which figures a study plans from its settings, and their files."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vlmopt.study import FIGURES, figure_file, planned_figures


def _figures_of(variants, tasks, sweep=None):
    config = {
        "variants": variants,
        "runs": [{"models": ["m"], "finetune": ["none"], "variants": sorted(variants), "tasks": tasks}],
        "profiling": {"sweep": sweep} if sweep else {},
    }
    return planned_figures(config)


def test_planned_figures_follow_the_study_settings():
    always = ["quality_vs_size", "quality_vs_cost", "task_bars"]
    # Retrieval with a baseline only: the three figures every study has, nothing else.
    assert _figures_of({"baseline": []}, {"retrieval": "d"}) == always
    # A single-step weight quantization: the drop-off and its 3-D view; captioning: the examples.
    assert _figures_of({"baseline": [], "w4": [{"method": "gptq", "bits": 4}]}, {"captioning": "d"}) == [
        "quality_vs_size",
        "quality_vs_cost",
        "quality_vs_bits",
        "dropoff_3d",
        "task_bars",
        "examples",
    ]
    # Weight-and-activation quantization is on the drop-off's lines but not in the 3-D view (its
    # activations change too); SVD after pruning is neither the SVD figure's nor without pruning.
    w8a8 = [{"method": "uniform", "bits": 8, "activation_bits": 8}]
    prune_svd = [{"method": "prune_layers", "drop_last": 1}, {"method": "svd", "ratio": 0.5}]
    assert _figures_of({"w8a8": w8a8, "p": prune_svd}, {"classification": "d"}) == [
        "quality_vs_size",
        "quality_vs_cost",
        "quality_vs_bits",
        "pruning",
        "task_bars",
    ]
    # A single SVD step, a real-vs-generated task and a sweep.
    assert _figures_of(
        {"baseline": [], "svd": [{"method": "svd", "ratio": 0.5}]},
        {"real_vs_generated": "d"},
        sweep={"batch_size": [1, 2]},
    ) == ["quality_vs_size", "quality_vs_cost", "svd", "task_bars", "confusion", "examples", "scaling"]


def test_every_figure_has_a_caption_category_file_and_inputs():
    assert list(FIGURES)[:3] == ["quality_vs_size", "quality_vs_cost", "quality_vs_bits"]
    for name, figure in FIGURES.items():
        assert figure.name == name and figure.caption and figure.category and figure.inputs
        assert figure_file(name) == f"{name}.{'html' if name == 'dropoff_3d' else 'png'}"
    with pytest.raises(ValueError, match="unknown figure 'nope'; known: quality_vs_size, "):
        figure_file("nope")


def test_planning_imports_neither_matplotlib_nor_torch():
    code = "import sys, vlmopt.study, vlmopt.report; print(sorted({'matplotlib', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
