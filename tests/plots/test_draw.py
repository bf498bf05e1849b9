"""Each figure of the table is drawn by the function it names, and its module counts in the figure jobs' code."""

from __future__ import annotations

from vlmopt.code_digest import stage_modules
from vlmopt.plots.draw import drawing
from vlmopt.study import FIGURES


def test_every_figure_names_a_drawing_function_the_figure_stage_covers():
    figure_stage = set(stage_modules("figure"))
    for name, figure in FIGURES.items():
        module, function = figure.draw.split(".")
        draw = drawing(name)
        assert callable(draw) and draw.__name__ == function
        assert draw.__module__ == f"vlmopt.plots.{module}" and draw.__module__ in figure_stage
