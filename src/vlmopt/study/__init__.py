"""A study file: validation beyond the JSON Schema, and expansion of runs into evaluations.

The JSON Schema (workflow/schemas/config.schema.yaml) checks keys, types and values; this package
checks what a schema cannot: that every slug a run names is defined, that tasks meet datasets
that exist, and that each evaluated combination is listed once. Its modules: :mod:`~.sweep` (the
profiling sweep's axes and points), :mod:`~.runs` (evaluations, profiling and sweep jobs),
:mod:`~.grids` (grids expanded into variants), :mod:`~.checks` (the study's consistency) and
:mod:`~.figures` (the report's figures and which a study gets). Planning never imports torch.
"""

from __future__ import annotations

from vlmopt.study.checks import check_study, check_study_file, check_variant_steps, check_variant_structure
from vlmopt.study.exports import exported
from vlmopt.study.figures import (
    FIGURES,
    PRUNING_METHODS,
    QUANTIZERS,
    Figure,
    figure_file,
    planned_figures,
    reads_classes,
)
from vlmopt.study.grids import expand_grids, grid_slug
from vlmopt.study.runs import (
    Evaluation,
    StudyError,
    canonical,
    evaluations,
    profiled,
    shard_count,
    swept,
)
from vlmopt.study.sweep import ATTENTION, AXES, DTYPE_NAMES, NUMERIC_AXES, SweepPoint, sweep_points

__all__ = [
    "ATTENTION",
    "AXES",
    "DTYPE_NAMES",
    "FIGURES",
    "NUMERIC_AXES",
    "PRUNING_METHODS",
    "QUANTIZERS",
    "Evaluation",
    "Figure",
    "StudyError",
    "SweepPoint",
    "canonical",
    "check_study",
    "check_study_file",
    "check_variant_steps",
    "check_variant_structure",
    "evaluations",
    "expand_grids",
    "figure_file",
    "grid_slug",
    "planned_figures",
    "exported",
    "profiled",
    "reads_classes",
    "shard_count",
    "swept",
    "sweep_points",
]
