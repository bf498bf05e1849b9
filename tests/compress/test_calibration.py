"""Layer input capture that stops after the layer, in pipeline order, and the settings of calibrated steps."""

from __future__ import annotations

import pytest

from vlmopt.compress import apply_variant
from vlmopt.compress.calibration import Calibration, capture_layer_inputs, layer_groups
from vlmopt.compress.select import select_modules
from vlmopt.models import load_model
from vlmopt.tasks.encode import calibration_batches


@pytest.fixture(scope="module")
def blip2(shapes_texts):
    return load_model("tiny:blip2-opt", texts=shapes_texts, seed=0)


@pytest.fixture(scope="module")
def calibration(blip2, shapes_train, shapes_root):
    return Calibration(*calibration_batches(blip2, shapes_train, shapes_root, n_samples=12, batch_size=4, seed=0))


def test_capture_stops_after_the_layer_and_drops_padding(blip2, calibration):
    parts = blip2.parts()
    refs = select_modules(blip2.model, parts, part="language", position="first", role="attention")
    later = select_modules(blip2.model, parts, part="language", position="last", role="attention")
    groups = layer_groups(refs + later, parts)
    assert [name for name, _ in groups] == [parts["language"][0][0], parts["language"][2][0]]
    seen: dict[str, int] = {}
    capture_layer_inputs(
        blip2.model,
        blip2.model.get_submodule(groups[0][0]),
        groups[0][1] + groups[1][1],
        calibration,
        lambda ref, x: seen.__setitem__(ref.name, seen.get(ref.name, 0) + x.shape[0]),
    )
    # The last layer never ran; the first layer's q/k/v/out saw exactly the real tokens.
    assert set(seen) == {r.name for r in groups[0][1]}
    real_tokens = sum(int(b["attention_mask"].sum()) for b in calibration.batches)
    assert all(count == real_tokens for count in seen.values())


def test_vision_layers_see_every_patch(blip2, calibration):
    parts = blip2.parts()
    refs = select_modules(blip2.model, parts, part="vision", position="first", role="mlp")
    fc1 = next(r for r in refs if r.name.endswith("fc1"))
    rows = []
    capture_layer_inputs(blip2.model, parts["vision"][0][1], [fc1], calibration, lambda ref, x: rows.append(x))
    config = blip2.model.config.vision_config
    n_tokens = (config.image_size // config.patch_size) ** 2 + 1  # patches and the class token
    assert sum(r.shape[0] for r in rows) == n_tokens * calibration.n_samples
    assert all(r.shape[1] == config.hidden_size for r in rows)


def test_calibrated_step_without_data_is_an_error(tiny):
    with pytest.raises(ValueError, match="step 0: gptq needs calibration data"):
        apply_variant(tiny.model, tiny.parts(), [{"method": "gptq", "bits": 4, "part": "language"}])


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"calibration": {"dataset": "shapes", "samples": 4}}, "unknown calibration setting"),
        ({"calibration": {"split": "train"}}, "calibration needs a dataset"),
        ({"damp": 0}, "damp must be between 0 and 1"),
        ({"bits": 16}, "bits must be an integer from 2 to 8"),
        ({"group_size": 0}, "group_size must be a positive integer"),
    ],
)
def test_bad_settings_name_the_key(tiny, settings, match):
    with pytest.raises(ValueError, match=match):
        apply_variant(tiny.model, tiny.parts(), [{"method": "gptq", "bits": 4, "part": "language", **settings}])
