"""Calibration batches from real samples, and layer input capture that stops after the layer."""

from __future__ import annotations

import pytest
import torch

from vlmopt.compress.calibrate import Calibration, capture_layer_inputs, layer_groups
from vlmopt.compress.select import select_modules
from vlmopt.models import load_model


@pytest.fixture(scope="module")
def blip2(shapes_texts):
    return load_model("tiny:blip2-opt", texts=shapes_texts, seed=0)


@pytest.fixture(scope="module")
def calibration(blip2, shapes_train, shapes_root):
    return Calibration.from_table(blip2, shapes_train, shapes_root, n_samples=12, batch_size=4, seed=0)


def test_batches_hold_images_and_both_tasks(calibration, blip2):
    assert calibration.n_samples == 12 and len(calibration.batches) == 3
    assert all("pixel_values" in b and "labels" not in b for b in calibration.batches)
    assert calibration.description["tasks"] == ["captioning", "vqa"]
    # Batches alternate tasks: the second carries the VQA prompt, the first a caption only.
    texts = [blip2.tokenizer.decode(b["input_ids"][0], skip_special_tokens=True).lower() for b in calibration.batches]
    assert "short answer" in texts[1] and "answer" not in texts[0]


def test_a_table_calibrates_the_tasks_it_has_columns_for(blip2, shapes_train, shapes_root):
    captions_only = shapes_train[["sample_id", "image", "references"]]
    calibration = Calibration.from_table(blip2, captions_only, shapes_root, n_samples=8, batch_size=4)
    assert calibration.description["tasks"] == ["captioning"]
    with pytest.raises(ValueError, match="has the columns of none of the tasks"):
        Calibration.from_table(blip2, shapes_train[["sample_id", "image", "label"]], shapes_root, n_samples=4)


def test_same_seed_same_samples(blip2, shapes_train, shapes_root, calibration):
    again = Calibration.from_table(blip2, shapes_train, shapes_root, n_samples=12, batch_size=4, seed=0)
    other = Calibration.from_table(blip2, shapes_train, shapes_root, n_samples=12, batch_size=4, seed=1)
    assert all(
        torch.equal(a["pixel_values"], b["pixel_values"])
        for a, b in zip(again.batches, calibration.batches, strict=True)
    )
    assert not all(
        torch.equal(a["pixel_values"], b["pixel_values"])
        for a, b in zip(other.batches, calibration.batches, strict=True)
    )


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
