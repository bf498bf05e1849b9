"""vlmopt.checkpoints: fingerprints, the rule deciding what may be resumed, setting aside, safe loading."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from vlmopt import checkpoints
from vlmopt.checkpoints import (
    changes,
    fingerprint,
    folder_fingerprint,
    load_tensors,
    resumable_step,
    save_tensors,
    stale_reason,
    write_checkpoint,
)

INPUTS = {"job": "test", "settings": {"lr": 0.001, "max_steps": None, "tasks": ("captioning",)}, "code": "abc"}


def _noop(folder):
    (folder / "payload.txt").write_text("x")


def test_fingerprint_is_of_canonical_json():
    reordered = {"code": "abc", "settings": {"tasks": ["captioning"], "max_steps": None, "lr": 1e-3}, "job": "test"}
    assert fingerprint(INPUTS) == fingerprint(reordered)
    assert len(fingerprint(INPUTS)) == 64
    assert fingerprint(INPUTS) != fingerprint({**INPUTS, "settings": {**INPUTS["settings"], "lr": 0.002}})
    with pytest.raises(TypeError, match="JSON values only"):
        fingerprint({"model": object()})


def test_changes_name_the_keys_that_differ():
    new = {"job": "test", "settings": {"lr": 0.002, "max_steps": 4, "tasks": ["captioning"]}, "base_model": "f00"}
    assert changes(checkpoints.canonical(INPUTS), new) == [
        'base_model: (absent) -> "f00"',
        'code: "abc" -> (absent)',
        "settings.lr: 0.001 -> 0.002",
        "settings.max_steps: null -> 4",
    ]


def test_the_step_past_the_end_is_refused_whatever_the_fingerprint():
    state = {"step": 5, "fingerprint": fingerprint(INPUTS), "inputs": checkpoints.canonical(INPUTS)}
    # Same fingerprint (as when the end is not one of the inputs): only the step decides.
    assert stale_reason(state, INPUTS, total=5) is None
    assert stale_reason(state, INPUTS, total=None) is None
    assert stale_reason(state, INPUTS, total=4) == "its step 5 is past the run's end (4 steps)"
    assert stale_reason({**state, "step": -1}, INPUTS, total=4) == "its step -1 is not a step count"
    assert stale_reason({**state, "step": "5"}, INPUTS, total=9) == "its step '5' is not a step count"


def test_a_checkpoint_without_a_readable_fingerprint_is_refused():
    assert stale_reason(None, INPUTS) == "its state.json is missing or unreadable"
    assert stale_reason({"step": 3}, INPUTS) == "it has no fingerprint of the run that wrote it"
    other = {**INPUTS, "code": "abd"}
    state = {"step": 3, "fingerprint": fingerprint(other), "inputs": checkpoints.canonical(other)}
    assert stale_reason(state, INPUTS) == 'it was written by a run with other inputs (code: "abd" -> "abc")'
    # Without the inputs recorded, the fingerprints are named.
    bare = {"step": 3, "fingerprint": fingerprint(other)}
    named = f"fingerprint {fingerprint(other)[:12]} -> {fingerprint(INPUTS)[:12]}"
    assert stale_reason(bare, INPUTS) == f"it was written by a run with other inputs ({named})"


def test_resume_or_set_aside(tmp_path, caplog):
    last = tmp_path / "last"
    assert resumable_step(last, INPUTS, total=10) is None
    write_checkpoint(last, 4, INPUTS, _noop)
    state = json.loads((last / "state.json").read_text())
    assert state == {"step": 4, "fingerprint": fingerprint(INPUTS), "inputs": checkpoints.canonical(INPUTS)}
    assert resumable_step(last, INPUTS, total=10) == 4
    assert resumable_step(last, INPUTS, total=4) == 4
    assert not caplog.records

    # Past the end: set aside under its fingerprint, with the reason.
    with caplog.at_level(logging.WARNING):
        assert resumable_step(last, INPUTS, total=3) is None
    assert not last.exists()
    aside = tmp_path / f"last.stale-{fingerprint(INPUTS)[:12]}"
    assert (aside / "payload.txt").read_text() == "x"
    assert "past the run's end (3 steps)" in caplog.text and str(aside) in caplog.text

    # The same checkpoint set aside again goes beside the first, which is kept.
    write_checkpoint(last, 4, INPUTS, _noop)
    assert resumable_step(last, INPUTS, total=2) is None
    assert (tmp_path / f"last.stale-{fingerprint(INPUTS)[:12]}-2" / "state.json").is_file() and aside.is_dir()

    # One from before fingerprints, and one with a broken state.json.
    last.mkdir()
    (last / "state.json").write_text('{"step": 6}')
    assert resumable_step(last, INPUTS, total=10) is None
    assert json.loads((tmp_path / "last.stale-unknown" / "state.json").read_text()) == {"step": 6}
    last.mkdir()
    (last / "state.json").write_text("{")
    assert resumable_step(last, INPUTS, total=10) is None
    assert (tmp_path / "last.stale-unknown-2").is_dir() and not last.exists()


def test_a_kill_between_the_renames_keeps_the_previous_checkpoint(tmp_path):
    last, old = tmp_path / "last", tmp_path / "last.old"
    write_checkpoint(last, 2, INPUTS, _noop)
    last.rename(old)  # where a kill after the first rename leaves it
    assert resumable_step(last, INPUTS, total=10) == 2 and last.is_dir() and not old.exists()
    # A leftover .old (killed while removing it) does not block the next write.
    old.mkdir()
    (old / "junk").write_text("x")
    write_checkpoint(last, 3, INPUTS, _noop)
    assert resumable_step(last, INPUTS, total=10) == 3 and not old.exists()


class _Payload:
    def __reduce__(self):
        return (_ran, ("unpickled",))


RAN: list[str] = []


def _ran(what):
    RAN.append(what)
    return what


def test_tensor_files_load_without_unpickling_objects(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    save_tensors({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp_path / "ok.pt")
    loaded = load_tensors(tmp_path / "ok.pt")
    assert torch.equal(loaded["rng"], torch.get_rng_state())
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    torch.optim.AdamW(model.parameters(), lr=1e-3).load_state_dict(loaded["optimizer"])

    RAN.clear()
    torch.save({"optimizer": _Payload()}, tmp_path / "poisoned.pt")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_tensors(tmp_path / "poisoned.pt")
    assert RAN == []


def test_folder_fingerprint_sees_names_sizes_small_files_and_sampled_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "WHOLE_FILE_BYTES", 1000)
    monkeypatch.setattr(checkpoints, "SAMPLED_BLOCK_BYTES", 100)
    monkeypatch.setattr(checkpoints, "SAMPLED_BLOCKS", 4)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden": 8}')
    weights = bytearray(range(256)) * 40  # 10240 bytes: blocks at 0, 3380, 6760, 10140
    (folder / "model.safetensors").write_bytes(weights)
    base = folder_fingerprint(folder)
    assert folder_fingerprint(folder) == base

    def changed(path, data):
        original = path.read_bytes()
        path.write_bytes(data)
        digest = folder_fingerprint(folder)
        path.write_bytes(original)
        return digest

    assert changed(folder / "config.json", b'{"hidden": 9}') != base
    for offset in (0, 3400, 6800, 10239):  # inside a sampled block
        edited = bytearray(weights)
        edited[offset] ^= 1
        assert changed(folder / "model.safetensors", bytes(edited)) != base, offset
    edited = bytearray(weights)
    edited[2000] ^= 1  # between the samples: documented as unseen
    assert changed(folder / "model.safetensors", bytes(edited)) == base
    assert changed(folder / "model.safetensors", bytes(weights) + b"\0") != base
    (folder / "model.safetensors").rename(folder / "other.safetensors")
    assert folder_fingerprint(folder) != base
