"""Grids expand into deterministic variants with readable slugs; params are canonical."""

from __future__ import annotations

import pytest

from vlmopt.study import StudyError, canonical, check_variant_steps, expand_grids, grid_slug


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
