"""Profiling sweep jobs: the points of the variants ``sweep_on`` picks, and bad sweeps named by key."""

from __future__ import annotations

import pytest

from vlmopt.study import StudyError, check_study, swept


def _swept_study(**profiling):
    return {
        "datasets": {"d": {"source": "synthetic"}},
        "models": {"a": {"source": "x/a"}, "b": {"source": "x/b"}},
        "finetune": {},
        "variants": {"baseline": [], "w8": [{"method": "uniform", "bits": 8, "part": "language"}]},
        "runs": [{"models": ["a", "b"], "finetune": ["none"], "variants": "all", "tasks": {"captioning": "d"}}],
        "profiling": profiling,
    }


def test_sweep_points_of_the_variants_sweep_on_picks():
    config = _swept_study(sweep={"batch_size": [1, 8], "compile": [True]}, sweep_on={"variants": ["w8"]})
    check_study(config)
    assert swept(config) == {
        ("a", "none", "w8", "batch_size-1"): {"axis": "batch_size", "value": 1},
        ("a", "none", "w8", "batch_size-8"): {"axis": "batch_size", "value": 8},
        ("a", "none", "w8", "compile-true"): {"axis": "compile", "value": True},
        ("b", "none", "w8", "batch_size-1"): {"axis": "batch_size", "value": 1},
        ("b", "none", "w8", "batch_size-8"): {"axis": "batch_size", "value": 8},
        ("b", "none", "w8", "compile-true"): {"axis": "compile", "value": True},
    }
    # Without sweep_on every profiled variant is swept; with profiling off, nothing is.
    assert len(swept(_swept_study(sweep={"dtype": ["bfloat16"]}))) == 4
    assert swept(_swept_study(enabled=False, sweep={"dtype": ["bfloat16"]})) == {}


@pytest.mark.parametrize(
    ("profiling", "match"),
    [
        ({"sweep": {"batch_size": [1]}, "sweep_on": {"models": ["c"]}}, r"sweep_on.models: \['c'\] not defined"),
        ({"sweep": {"batch_size": [1]}, "sweep_on": {"finetune": ["full"]}}, r"sweep_on.finetune: \['full'\] not"),
        ({"sweep": {"batch_size": [1]}, "sweep_on": {"models": ["a"], "variants": []}}, "selects no profiled"),
        ({"sweep": {"attn_implementation": ["flash"]}}, r"attn_implementation: 'flash' is not one of"),
    ],
)
def test_bad_sweeps_name_the_key(profiling, match):
    with pytest.raises(StudyError, match=match):
        check_study(_swept_study(**profiling))
