"""Calibration batches from real samples: images with the prompts of the tasks the table serves, drawn by seed."""

from __future__ import annotations

import pytest
import torch

from vlmopt.compress.calibration import Calibration
from vlmopt.tasks.encode import calibration_batches


def test_batches_hold_images_and_both_tasks(blip2_calibration, blip2_opt):
    assert blip2_calibration.n_samples == 12 and len(blip2_calibration.batches) == 3
    assert all("pixel_values" in b and "labels" not in b for b in blip2_calibration.batches)
    assert blip2_calibration.description["tasks"] == ["captioning", "vqa"]
    # Batches alternate tasks: the second carries the VQA prompt, the first a caption only.
    texts = [
        blip2_opt.tokenizer.decode(b["input_ids"][0], skip_special_tokens=True).lower()
        for b in blip2_calibration.batches
    ]
    assert "short answer" in texts[1] and "answer" not in texts[0]


def test_a_table_calibrates_the_tasks_it_has_columns_for(blip2_opt, shapes_train, shapes_root):
    captions_only = shapes_train[["sample_id", "image", "references"]]
    blip2_calibration = Calibration(
        *calibration_batches(blip2_opt, captions_only, shapes_root, n_samples=8, batch_size=4)
    )
    assert blip2_calibration.description["tasks"] == ["captioning"]
    with pytest.raises(ValueError, match="has the columns of none of the tasks"):
        calibration_batches(blip2_opt, shapes_train[["sample_id", "image", "label"]], shapes_root, n_samples=4)


def test_same_seed_same_samples(blip2_opt, shapes_train, shapes_root, blip2_calibration):
    again = Calibration(*calibration_batches(blip2_opt, shapes_train, shapes_root, n_samples=12, batch_size=4, seed=0))
    other = Calibration(*calibration_batches(blip2_opt, shapes_train, shapes_root, n_samples=12, batch_size=4, seed=1))
    assert all(
        torch.equal(a["pixel_values"], b["pixel_values"])
        for a, b in zip(again.batches, blip2_calibration.batches, strict=True)
    )
    assert not all(
        torch.equal(a["pixel_values"], b["pixel_values"])
        for a, b in zip(other.batches, blip2_calibration.batches, strict=True)
    )


def test_only_the_drawn_rows_images_are_read_and_an_unreadable_one_is_named(
    blip2_opt, shapes_train, shapes_root, monkeypatch, tmp_path
):
    import vlmopt.streaming

    opened = []
    real_open = vlmopt.streaming.open_image

    def counting(root, rel):
        opened.append(rel)
        return real_open(root, rel)

    monkeypatch.setattr(vlmopt.streaming, "open_image", counting)
    _, description = calibration_batches(blip2_opt, shapes_train, shapes_root, n_samples=6, batch_size=4, seed=3)
    drawn = torch.randperm(len(shapes_train), generator=torch.Generator().manual_seed(3))[:6].tolist()
    assert description["n_samples"] == 6 and len(shapes_train) > 6
    assert opened == shapes_train["image"].iloc[sorted(drawn)].tolist()

    broken = shapes_train.head(4).assign(image=["images/train/missing.png"] * 4)
    with pytest.raises(OSError, match="a calibration image cannot be read: .*missing.png"):
        calibration_batches(blip2_opt, broken, shapes_root, n_samples=4, batch_size=4)
