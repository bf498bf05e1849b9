from __future__ import annotations

import pytest
import torch

from vlmopt.finetune.config import FullFinetuneConfig
from vlmopt.finetune.full import finetune
from vlmopt.models import load_model


def _weights(loaded):
    return {k: v.clone() for k, v in loaded.model.state_dict().items()}


def test_resume_after_interruption_gives_the_same_weights(
    shapes_texts, shapes_train, shapes_root, tmp_path, monkeypatch
):
    config = FullFinetuneConfig(epochs=2, batch_size=16, lr=2e-3, checkpoint_every=3, max_steps=9)
    straight = load_model("tiny:blip", texts=shapes_texts, seed=0)
    finetune(straight, shapes_train, shapes_root, config, checkpoint_dir=tmp_path / "a", progress=False)

    resumed = load_model("tiny:blip", texts=shapes_texts, seed=0)
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("killed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        finetune(resumed, shapes_train, shapes_root, config, checkpoint_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert (tmp_path / "b" / "last" / "state.json").read_text() == '{"step": 6}'

    fresh = load_model("tiny:blip", texts=shapes_texts, seed=0)
    summary = finetune(fresh, shapes_train, shapes_root, config, checkpoint_dir=tmp_path / "b", progress=False)
    assert summary["resumed_from_step"] == 6
    a, b = _weights(straight), _weights(fresh)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loss_falls(shapes_texts, shapes_train, shapes_root, tmp_path):
    loaded = load_model("tiny:blip2-opt", texts=shapes_texts, seed=0)
    config = FullFinetuneConfig(epochs=10, batch_size=16, lr=3e-3, max_steps=40)
    summary = finetune(loaded, shapes_train, shapes_root, config, checkpoint_dir=tmp_path, progress=False)
    assert summary["last_loss"] < 0.6 * summary["first_loss"]


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match=r"unknown finetune setting\(s\) \['epoch'\]"):
        FullFinetuneConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="batch_size"):
        FullFinetuneConfig.from_dict({"batch_size": 0})
    with pytest.raises(ValueError, match="tasks must be a list of task names"):
        FullFinetuneConfig.from_dict({"tasks": "captioning"})
    # Task names are checked against the registry when training starts, before any image is read.
    with pytest.raises(ValueError, match="unknown task 'ocr'"):
        finetune(None, None, "no-such-folder", FullFinetuneConfig.from_dict({"tasks": ["ocr"]}), checkpoint_dir="x")
