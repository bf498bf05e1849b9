"""Checkpoints of resumable jobs, resumed only by a run with the same inputs.

A job that can be killed and rerun (finetuning; any training, labeling or calibration loop)
keeps its progress in a checkpoint folder, ``<checkpoint_dir>/last``. Besides what the job itself
writes there, the folder holds ``state.json``::

    {"step": 400, "fingerprint": "<sha256>", "inputs": {"settings": {...}, "code": "...", ...}}

``inputs`` is everything that determines the run's result (settings, seed, digests of the base
model, of the data and of the code), as JSON; the fingerprint is the sha256 of its canonical JSON
(sorted keys, no spaces). A rerun resumes the checkpoint (:func:`resumable_step`) only when its
own fingerprint is the same and the checkpoint's step is not past the run's end. Any other
checkpoint (different inputs, no fingerprint, an unreadable ``state.json``, a step past the end)
is never resumed: it is renamed ``last.stale-<first 12 hex digits of its fingerprint>`` (``-2``,
``-3``, ... when taken; ``unknown`` without a fingerprint) in the same folder, and a warning names
the reason, down to the inputs that differ (``settings.lr: 0.001 -> 0.002``). Nothing is deleted
here: renaming such a folder back to ``last`` resumes it, if the run's inputs match it again.
Whoever owns the checkpoint folder decides when set-aside checkpoints go (finetuning removes the
whole folder once its model is saved).

A checkpoint is written atomically (:func:`write_checkpoint`: a temporary folder, ``state.json``
last, then renamed into place), so a kill leaves either the previous checkpoint or the new one.
Tensor files are read with :func:`load_tensors`, which unpickles tensors and plain containers only
(``torch.load(weights_only=True)``), never arbitrary objects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "canonical",
    "changes",
    "fingerprint",
    "folder_fingerprint",
    "load_tensors",
    "read_state",
    "resumable_step",
    "save_tensors",
    "set_aside",
    "stale_reason",
    "write_checkpoint",
]

log = logging.getLogger(__name__)

STATE = "state.json"

#: Files up to this size are hashed whole by :func:`folder_fingerprint`; larger ones are sampled.
WHOLE_FILE_BYTES = 8 << 20
#: :func:`folder_fingerprint` hashes this many evenly spaced blocks of a larger file, first and last included.
SAMPLED_BLOCKS = 16
SAMPLED_BLOCK_BYTES = 1 << 20


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    raise TypeError(f"a checkpoint fingerprint holds JSON values only, not {type(value).__name__} ({value!r})")


def _canonical_json(inputs: Mapping[str, Any]) -> str:
    return json.dumps(
        inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=_json_default
    )


def canonical(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """``inputs`` as they read back from JSON (tuples as lists, paths as strings)."""
    return json.loads(_canonical_json(inputs))


def fingerprint(inputs: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of ``inputs``: sorted keys, no spaces, ASCII."""
    return hashlib.sha256(_canonical_json(inputs).encode()).hexdigest()


_ABSENT = object()


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def changes(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The entries that differ between two fingerprints' inputs, as ``key.sub: old -> new``, sorted."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        name = f"{prefix}{key}"
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += changes(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {_show(a)} -> {_show(b)}")
    return out


def stale_reason(state: Mapping[str, Any] | None, inputs: Mapping[str, Any], total: int | None = None) -> str | None:
    """Why a checkpoint whose ``state.json`` holds ``state`` must not be resumed by a run with ``inputs``
    of ``total`` steps (None: no end known); None when it may be.

    ``state`` None stands for a missing or unreadable ``state.json``. A checkpoint is resumable
    when its fingerprint is that of ``inputs`` and its step is a count no larger than ``total``:
    a step past the end is refused whatever the fingerprint covers.
    """
    if not isinstance(state, Mapping):
        return "its state.json is missing or unreadable"
    reasons = []
    recorded = state.get("fingerprint")
    if not isinstance(recorded, str):
        reasons.append("it has no fingerprint of the run that wrote it")
    elif recorded != fingerprint(inputs):
        old = state.get("inputs")
        diff = changes(old, canonical(inputs)) if isinstance(old, Mapping) else []
        detail = "; ".join(diff) if diff else f"fingerprint {recorded[:12]} -> {fingerprint(inputs)[:12]}"
        reasons.append(f"it was written by a run with other inputs ({detail})")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        reasons.append(f"its step {step!r} is not a step count")
    elif total is not None and step > total:
        reasons.append(f"its step {step} is past the run's end ({total} steps)")
    return "; ".join(reasons) or None


def read_state(directory: str | Path) -> dict[str, Any] | None:
    """The checkpoint's ``state.json``, None when it is missing, unreadable or not a JSON object."""
    try:
        state = json.loads((Path(directory) / STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def set_aside(directory: str | Path, state: Mapping[str, Any] | None = None) -> Path:
    """Rename the checkpoint ``directory`` to ``<name>.stale-<fingerprint[:12]>`` beside it; the new path."""
    directory = Path(directory)
    recorded = state.get("fingerprint") if isinstance(state, Mapping) else None
    tag = recorded[:12] if isinstance(recorded, str) and recorded.isalnum() else "unknown"
    target = directory.with_name(f"{directory.name}.stale-{tag}")
    n = 1
    while target.exists():
        n += 1
        target = directory.with_name(f"{directory.name}.stale-{tag}-{n}")
    os.replace(directory, target)
    return target


def resumable_step(directory: str | Path, inputs: Mapping[str, Any], total: int | None = None) -> int | None:
    """The step to resume at from the checkpoint ``directory``, None when there is none to resume.

    A checkpoint that :func:`stale_reason` refuses is set aside (:func:`set_aside`) with a warning
    saying why, and None is returned: the run starts from the beginning.
    """
    directory = Path(directory)
    old = directory.with_name(directory.name + ".old")
    if not directory.exists() and old.is_dir():
        # Killed between write_checkpoint's two renames: the previous checkpoint is whole.
        os.replace(old, directory)
    if not directory.exists():
        return None
    state = read_state(directory)
    reason = stale_reason(state, inputs, total)
    if reason is None:
        return int(state["step"])
    moved = set_aside(directory, state)
    log.warning(
        "not resuming from checkpoint %s: %s; set it aside as %s and starting from step 0", directory, reason, moved
    )
    return None


def write_checkpoint(
    directory: str | Path, step: int, inputs: Mapping[str, Any], write: Callable[[Path], None]
) -> None:
    """Write a checkpoint at ``step`` of the run with ``inputs`` to ``directory``, atomically.

    ``write(folder)`` writes the job's own files into a temporary folder beside ``directory``;
    ``state.json`` (step, fingerprint, inputs) is written after them, then the folder replaces
    ``directory`` by renaming.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    state = {"step": int(step), "fingerprint": fingerprint(inputs), "inputs": canonical(inputs)}
    (tmp / STATE).write_text(json.dumps(state, indent=1, sort_keys=True))
    # A leftover of a kill during the previous write's clean-up would block the rename below.
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def save_tensors(obj: Any, path: str | Path) -> None:
    """Save tensors in plain containers (dicts, lists, numbers, strings) for :func:`load_tensors`."""
    import torch

    torch.save(obj, path)


def load_tensors(path: str | Path) -> Any:
    """Load a :func:`save_tensors` file onto the CPU, unpickling tensors and plain containers only.

    A file holding any other object (which unpickling could run code for) is a ``ValueError``.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds objects other than tensors and plain containers; refusing to unpickle it "
            f"(delete its checkpoint to start over): {str(e).splitlines()[0]}"
        ) from e


def _sampled_digest(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        if size <= WHOLE_FILE_BYTES:
            h.update(f.read())
        else:
            last = size - SAMPLED_BLOCK_BYTES
            for i in range(SAMPLED_BLOCKS):
                f.seek(last * i // (SAMPLED_BLOCKS - 1))
                h.update(f.read(SAMPLED_BLOCK_BYTES))
    return h.hexdigest()


def folder_fingerprint(folder: str | Path) -> str:
    """A digest of the files under ``folder`` (a saved model), cheap enough to take at every start.

    Every file's relative path and size count; files up to 8 MiB (configs, processor and tokenizer
    files) are hashed whole, and of each larger one (weights) 16 evenly spaced 1 MiB blocks, its
    first and last included. Hashing multi-GB weights whole at each start would take minutes; the
    samples still tell apart any two builds that differ in their settings, seed or source (shapes
    change the sizes and the safetensors header in the first block; a different initialisation
    or training changes every block). A change confined to bytes between the samples, leaving the
    size alone, goes unnoticed.
    """
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        h.update(json.dumps([path.relative_to(folder).as_posix(), size, _sampled_digest(path, size)]).encode())
    return h.hexdigest()
