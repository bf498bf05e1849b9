"""Planning a variant on a weightless model selects what applying it on the real one does."""

from __future__ import annotations

import pytest

from vlmopt.compress import apply_variant
from vlmopt.compress.plan import plan_variant
from vlmopt.models import load_model
from vlmopt.models.skeleton import model_skeleton

VARIANTS = {
    "w4-language-last": [{"method": "uniform", "bits": 4, "part": "language", "position": "last"}],
    "keep-2-then-w8-last": [
        {"method": "prune_layers", "part": "language", "keep": 2},
        {"method": "uniform", "bits": 8, "part": "language", "position": "last"},
    ],
    "drop-vision-0-then-int8": [
        {"method": "prune_layers", "part": "vision", "layers": [0]},
        {"method": "uniform", "bits": 8, "part": "vision", "position": "last", "role": "attention"},
        {"method": "dynamic_int8", "part": "bridge"},
    ],
}


@pytest.fixture(scope="module")
def saved_blip2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blip2")
    load_model("tiny:blip2-opt").save(folder)
    return folder


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_plan_selects_as_many_modules_per_step_as_the_real_variant(saved_blip2, variant):
    family, skeleton = model_skeleton(str(saved_blip2))
    planned = plan_variant(skeleton, family.parts(skeleton), VARIANTS[variant])
    loaded = load_model(saved_blip2)
    manifest = apply_variant(loaded.model, loaded.parts(), VARIANTS[variant])
    applied = [step["n_modules"] for step in manifest["steps"]]
    assert planned == applied
    assert all(n > 0 for n in planned)


def test_the_plan_follows_pruned_layers_and_stops_at_an_opaque_step(saved_blip2):
    family, skeleton = model_skeleton(str(saved_blip2))
    parts = family.parts(skeleton)
    # Two of three language layers dropped, then the middle position of one layer is empty.
    with pytest.raises(
        ValueError, match=r"step 1: uniform: no Linear module matches part='language', position='middle'"
    ):
        plan_variant(
            skeleton,
            parts,
            [
                {"method": "prune_layers", "part": "language", "keep": 1},
                {"method": "uniform", "bits": 8, "part": "language", "position": "middle"},
            ],
        )
    # After svd nothing is planned: the factorized modules exist only once the real step ran.
    planned = plan_variant(
        skeleton,
        parts,
        [{"method": "svd", "ratio": 0.5, "part": "language"}, {"method": "uniform", "bits": 8, "part": "bridge"}],
    )
    assert len(planned) == 1
    # The model's parts are not changed by planning.
    assert {k: len(v) for k, v in family.parts(skeleton).items()} == {"vision": 3, "bridge": 3, "language": 3}
