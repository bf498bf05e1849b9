"""Layer input capture that stops after the layer, in pipeline order, and the settings of calibrated steps."""

from __future__ import annotations

import pytest

from vlmopt.compress import apply_variant
from vlmopt.compress.calibration import capture_layer_inputs, layer_groups
from vlmopt.compress.select import select_modules


def test_capture_stops_after_the_layer_and_drops_padding(blip2_opt, blip2_calibration):
    parts = blip2_opt.parts()
    refs = select_modules(blip2_opt.model, parts, part="language", position="first", role="attention")
    later = select_modules(blip2_opt.model, parts, part="language", position="last", role="attention")
    groups = layer_groups(refs + later, parts)
    assert [name for name, _ in groups] == [parts["language"][0][0], parts["language"][2][0]]
    seen: dict[str, int] = {}
    capture_layer_inputs(
        blip2_opt.model,
        blip2_opt.model.get_submodule(groups[0][0]),
        groups[0][1] + groups[1][1],
        blip2_calibration,
        lambda ref, x: seen.__setitem__(ref.name, seen.get(ref.name, 0) + x.shape[0]),
    )
    # The last layer never ran; the first layer's q/k/v/out saw exactly the real tokens.
    assert set(seen) == {r.name for r in groups[0][1]}
    real_tokens = sum(int(b["attention_mask"].sum()) for b in blip2_calibration.batches)
    assert all(count == real_tokens for count in seen.values())


def test_vision_layers_see_every_patch(blip2_opt, blip2_calibration):
    parts = blip2_opt.parts()
    refs = select_modules(blip2_opt.model, parts, part="vision", position="first", role="mlp")
    fc1 = next(r for r in refs if r.name.endswith("fc1"))
    rows = []
    capture_layer_inputs(
        blip2_opt.model, parts["vision"][0][1], [fc1], blip2_calibration, lambda ref, x: rows.append(x)
    )
    config = blip2_opt.model.config.vision_config
    n_tokens = (config.image_size // config.patch_size) ** 2 + 1  # patches and the class token
    assert sum(r.shape[0] for r in rows) == n_tokens * blip2_calibration.n_samples
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
