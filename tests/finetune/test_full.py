from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace

import pytest
import torch

from vlmopt.checkpoints import folder_fingerprint
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
    assert json.loads((tmp_path / "b" / "last" / "state.json").read_text())["step"] == 6

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


def _interrupted(loaded, train, root, config, checkpoint_dir, monkeypatch, *, at: int) -> None:
    """Run ``finetune`` and kill it at its ``at``-th optimizer step (after the checkpoints before it)."""
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt("killed")
        return real_step(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", dying_step)
        with pytest.raises(KeyboardInterrupt):
            finetune(loaded, train, root, config, checkpoint_dir=checkpoint_dir, progress=False)


def _clean_run(shapes_texts, shapes_train, shapes_root, config, checkpoint_dir):
    loaded = load_model("tiny:blip", texts=shapes_texts, seed=0)
    finetune(loaded, shapes_train, shapes_root, config, checkpoint_dir=checkpoint_dir, progress=False)
    return _weights(loaded)


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_checkpoint_of_other_settings_is_set_aside_not_resumed(
    shapes_texts, shapes_train, shapes_root, tmp_path, monkeypatch, caplog
):
    first = FullFinetuneConfig(epochs=2, batch_size=16, lr=1e-3, checkpoint_every=2, max_steps=6)
    ckpt = tmp_path / "ck"
    _interrupted(
        load_model("tiny:blip", texts=shapes_texts, seed=0), shapes_train, shapes_root, first, ckpt, monkeypatch, at=5
    )
    written = json.loads((ckpt / "last" / "state.json").read_text())
    assert written["step"] == 4 and written["inputs"]["settings"]["lr"] == 1e-3

    second = replace(first, lr=2e-3)
    rerun = load_model("tiny:blip", texts=shapes_texts, seed=0)
    with caplog.at_level(logging.INFO):
        summary = finetune(rerun, shapes_train, shapes_root, second, checkpoint_dir=ckpt, progress=False)
    assert summary["resumed_from_step"] == 0 and summary["config"]["lr"] == 2e-3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "settings.lr: 0.001 -> 0.002" in warnings[0], warnings
    assert "resumed finetuning" not in caplog.text
    # The old checkpoint is kept beside, under its fingerprint, untouched.
    stale = ckpt / f"last.stale-{written['fingerprint'][:12]}"
    assert json.loads((stale / "state.json").read_text()) == written

    _assert_same_weights(
        _weights(rerun), _clean_run(shapes_texts, shapes_train, shapes_root, second, tmp_path / "clean")
    )


def test_a_checkpoint_past_the_end_of_the_run_is_not_resumed(
    shapes_texts, shapes_train, shapes_root, tmp_path, monkeypatch, caplog
):
    longer = FullFinetuneConfig(epochs=2, batch_size=16, lr=2e-3, checkpoint_every=2, max_steps=6)
    ckpt = tmp_path / "ck"
    _interrupted(
        load_model("tiny:blip", texts=shapes_texts, seed=0), shapes_train, shapes_root, longer, ckpt, monkeypatch, at=5
    )
    assert json.loads((ckpt / "last" / "state.json").read_text())["step"] == 4

    shorter = replace(longer, max_steps=2)
    rerun = load_model("tiny:blip", texts=shapes_texts, seed=0)
    summary = finetune(rerun, shapes_train, shapes_root, shorter, checkpoint_dir=ckpt, progress=False)
    assert summary["resumed_from_step"] == 0 and summary["steps"] == 2
    assert summary["first_loss"] is not None
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "settings.max_steps: 6 -> 2" in message and "its step 4 is past the run's end (2 steps)" in message
    assert not (ckpt / "last").exists()  # a 2-step run writes no checkpoint
    assert len(list(ckpt.glob("last.stale-*"))) == 1

    _assert_same_weights(
        _weights(rerun), _clean_run(shapes_texts, shapes_train, shapes_root, shorter, tmp_path / "clean")
    )


class _Payload:
    """Unpickling it would call ``_ran`` (as a poisoned file would run its code)."""

    def __reduce__(self):
        return (_ran, ("unpickled",))


RAN: list[str] = []


def _ran(what):
    RAN.append(what)
    return what


def test_a_poisoned_trainer_file_is_refused_not_unpickled(
    shapes_texts, shapes_train, shapes_root, tmp_path, monkeypatch
):
    config = FullFinetuneConfig(epochs=1, batch_size=16, lr=2e-3, checkpoint_every=1, max_steps=3)
    ckpt = tmp_path / "ck"
    _interrupted(
        load_model("tiny:blip", texts=shapes_texts, seed=0), shapes_train, shapes_root, config, ckpt, monkeypatch, at=2
    )
    trainer = ckpt / "last" / "trainer.pt"
    # What finetuning writes loads with weights_only=True: an AdamW state dict and RNG ByteTensors.
    saved = torch.load(trainer, weights_only=True)
    assert saved["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert saved["rng"].dtype == torch.uint8 and saved["optimizer"]["state"]
    torch.save({**saved, "optimizer": _Payload()}, trainer)

    RAN.clear()
    rerun = load_model("tiny:blip", texts=shapes_texts, seed=0)
    before = _weights(rerun)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        finetune(rerun, shapes_train, shapes_root, config, checkpoint_dir=ckpt, progress=False)
    assert RAN == []
    _assert_same_weights(before, _weights(rerun))  # nothing of the checkpoint was loaded
    # The same file read without the restriction would have run the payload.
    torch.load(trainer, weights_only=False)
    assert RAN == ["unpickled"]


def test_finetune_model_fingerprints_the_base_model_and_code_and_logs_a_run_without_steps(
    shapes_texts, shapes_root, tmp_path, monkeypatch, caplog
):
    import vlmopt.finetune.full as full
    from vlmopt.pipeline import finetune_model

    load_model("tiny:blip", texts=shapes_texts, seed=0).save(tmp_path / "base")
    seen = {}

    def no_steps(loaded, train, root, config, *, checkpoint_dir, progress=True, fingerprint_extra=None):
        seen.update(fingerprint_extra)
        # A run resumed at its last step: no step trained, no loss.
        summary = {"config": asdict(config), "steps": 4, "resumed_from_step": 4, "seconds": 0.0}
        return summary | {"first_loss": None, "last_loss": None}

    monkeypatch.setattr(full, "finetune", no_steps)
    with caplog.at_level(logging.INFO):
        summary = finetune_model(
            tmp_path / "base",
            tmp_path / "out",
            settings={"max_steps": 4},
            train_table=shapes_root / "train.parquet",
            dataset_root=shapes_root,
            checkpoint_dir=tmp_path / "ck",
            code="c0de",
        )
    assert summary["first_loss"] is None
    assert seen == {"code": "c0de", "base_model": folder_fingerprint(tmp_path / "base")}
    assert "(steps 4 to 4), loss n/a -> n/a" in caplog.text
