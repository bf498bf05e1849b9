"""Study-file logic beyond the schema: grids expand into deterministic variants, params are canonical."""

from __future__ import annotations

import pytest

from vlmopt.study import StudyError, canonical, check_variant_steps, expand_grids, grid_slug, planned_figures


def _grid(**spec):
    return {"variants": {"baseline": []}, "grids": {"g": spec}}


def test_grid_is_the_cartesian_product_in_axis_order():
    config = _grid(
        axes={"bits": [2, 4], "part": ["vision", "language"], "position": ["first", ["first", "last"]]},
        steps=[{"method": "uniform", "bits": "{bits}", "part": "{part}", "position": "{position}"}],
    )
    variants = expand_grids(config)
    assert len(variants) == 8
    assert list(variants)[:3] == [
        "g-bits2-partvision-positionfirst",
        "g-bits2-partvision-positionfirst_last",
        "g-bits2-partlanguage-positionfirst",
    ]
    # Values keep their types: ints stay ints, lists stay lists.
    assert variants["g-bits4-partlanguage-positionfirst_last"] == [
        {"method": "uniform", "bits": 4, "part": "language", "position": ["first", "last"]}
    ]
    check_variant_steps({"variants": variants})
    # Same input, same slugs and order.
    assert list(expand_grids(config)) == list(variants)


def test_multi_step_grid_and_skip():
    config = _grid(
        axes={"vision_bits": [4, 8], "language_bits": [4, 8]},
        steps=[
            {"method": "uniform", "bits": "{vision_bits}", "part": "vision"},
            {"method": "uniform", "bits": "{language_bits}", "part": "language"},
        ],
        skip=[{"vision_bits": 8, "language_bits": 8}],
    )
    variants = expand_grids(config)
    assert sorted(variants) == [
        "g-visionbits4-languagebits4",
        "g-visionbits4-languagebits8",
        "g-visionbits8-languagebits4",
    ]
    assert [s["bits"] for s in variants["g-visionbits8-languagebits4"]] == [8, 4]


def test_slug_of_decimals_and_booleans():
    assert grid_slug("svd", {"ratio": 0.25, "symmetric": True}) == "svd-ratio0p25-symmetrictrue"


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"axes": {"bits": [4]}, "steps": [{"method": "uniform", "bits": "{bit}", "part": "vision"}]}, "never appear"),
        (
            {"axes": {"bits": [4]}, "steps": [{"method": "uniform", "bits": "{bits}", "part": "{part}"}]},
            "'{part}' is not an axis",
        ),
        ({"axes": {"bits": [4, 4]}, "steps": [{"method": "uniform", "bits": "{bits}", "part": "all"}]}, "repeated"),
        (
            {
                "axes": {"bits": [4]},
                "steps": [{"method": "uniform", "bits": "{bits}", "part": "all"}],
                "skip": [{"b": 4}],
            },
            "skip\\[0\\]: \\['b'\\] are not axes",
        ),
    ],
)
def test_bad_grids_name_the_key(spec, match):
    with pytest.raises(StudyError, match=match):
        expand_grids(_grid(**spec))


def test_grid_slug_colliding_with_a_variant_is_refused():
    config = _grid(axes={"bits": [4]}, steps=[{"method": "uniform", "bits": "{bits}", "part": "all"}])
    config["variants"]["g-bits4"] = []
    with pytest.raises(StudyError, match="'g-bits4' is produced twice or also declared"):
        expand_grids(config)


def test_canonical_sorts_keys_at_every_depth_and_keeps_list_order():
    value = {"b": [{"y": 1, "x": 2}, 3], "a": {"d": 1, "c": 2}}
    out = canonical(value)
    assert list(out) == ["a", "b"] and list(out["a"]) == ["c", "d"] and list(out["b"][0]) == ["x", "y"]
    assert out["b"][1] == 3 and out == value


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
    from vlmopt.study import check_study, swept

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
    from vlmopt.study import check_study

    with pytest.raises(StudyError, match=match):
        check_study(_swept_study(**profiling))


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
