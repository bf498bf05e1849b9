"""Variant folders that share the weight files they leave unchanged.

Most variants of a study change a few modules of their base model (a third of the ViT's
attention, the language model's feed-forward layers); written whole, each is a full copy of the
model (15.5 GB for BLIP-2 OPT-2.7B in float32). :func:`share_weights` rewrites a saved folder's
safetensors as one file per module group (:func:`group_of`: each child of a numbered layer, such
as ``...layers.3.self_attn`` or ``...layers.3.fc1``, and each module outside the layers) and
replaces every file whose bytes are already in the ``store`` by a hard link to that copy; a new
file joins the store. A module that a variant leaves as it was gives the same bytes in every
variant of the same base model, so it is on disk once. The folder stays a standard sharded
checkpoint (``model.safetensors.index.json``), which transformers and vLLM load as any other, and
each file can be moved or copied on its own.

The store (``results/models/.shared`` in the pipeline) holds files named by the SHA-256 of their
bytes, read-only. A file whose link count is 1 belongs to no variant any more (its variants were
deleted or rebuilt) and can be removed: ``find results/models/.shared -links 1 -delete``. Where
the store is on another file system than the folder (no hard links), the folder keeps its own
files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from vlmopt.data.download import file_digest

__all__ = ["INDEX", "group_of", "share_weights", "weight_files"]

log = logging.getLogger(__name__)

#: The index of a sharded safetensors checkpoint, as transformers names it.
INDEX = "model.safetensors.index.json"
_PREFIX = "weights."


def group_of(name: str) -> str:
    """The module group a tensor is stored with: up to the child of its first numbered component
    (``a.layers.3.fc1.weight`` -> ``a.layers.3.fc1``), else its module (``a.embed.weight`` -> ``a.embed``)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: min(i + 2, len(parts) - 1)])
    return ".".join(parts[:-1]) or "root"


def _file_name(group: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", group)
    if len(safe) > 200:
        safe = safe[:180] + "-" + hashlib.sha256(group.encode()).hexdigest()[:16]
    return f"{_PREFIX}{safe}.safetensors"


def weight_files(folder: Path, purpose: str) -> list[Path]:
    """The safetensors files of a saved model: those its index names, else ``model.safetensors``;
    a FileNotFoundError naming ``purpose`` (what cannot be done) where there are none."""
    index = folder / INDEX
    if index.is_file():
        return [folder / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise FileNotFoundError(f"{folder} holds no model.safetensors (or index): {purpose}")


def _place(temporary: Path, target: Path, kept: Path) -> bool:
    """Move ``temporary`` to ``target`` as a hard link of the store's copy ``kept``; True if that copy
    existed already (``temporary`` is dropped), False if ``temporary`` became it."""
    os.chmod(temporary, 0o444)
    try:
        os.link(temporary, kept)
    except FileExistsError:  # already in the store (or another job put it there just now)
        link = temporary.with_name(temporary.name + ".link")
        os.link(kept, link)
        os.replace(link, target)
        temporary.unlink()
        return True
    os.replace(temporary, target)
    return False


def share_weights(folder: str | Path, store: str | Path) -> dict[str, Any]:
    """Rewrite ``folder``'s weights as one safetensors file per module group, each hard-linked to its
    copy in ``store`` (see the module docstring). Returns ``files`` (written), ``linked`` (found in
    the store already), ``linked_bytes`` (their size: the disk saved) and ``store``.

    The tensors are read one group at a time. Nothing is written over an existing file: each file
    is written under a temporary name and renamed, so that a file shared with other folders is
    never changed in place.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder, store = Path(folder), Path(store)
    store.mkdir(parents=True, exist_ok=True)
    sources = weight_files(folder, "no weights to share")
    located: dict[str, Path] = {}
    metadata: dict[str, str] = {}
    for path in sources:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or metadata
            located.update({key: path for key in f.keys()})
    groups: dict[str, list[str]] = {}
    for key in sorted(located):
        groups.setdefault(group_of(key), []).append(key)
    weight_map, total, linked, linked_bytes, cross_device = {}, 0, 0, 0, False
    written: list[Path] = []
    for group, keys in groups.items():
        tensors = {}
        for path in dict.fromkeys(located[key] for key in keys):
            with safe_open(path, framework="pt") as f:
                tensors.update({key: f.get_tensor(key) for key in keys if located[key] == path})
        name = _file_name(group)
        target = folder / name
        temporary = folder / f".{name}.tmp"
        save_file(tensors, temporary, metadata={"format": metadata.get("format", "pt")})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        digest = file_digest(temporary)
        if not cross_device:
            try:
                if _place(temporary, target, store / f"{digest}.safetensors"):
                    linked += 1
                    linked_bytes += target.stat().st_size
            except OSError as err:  # another file system: no hard links
                log.warning("weights are not shared with %s (%s); %s keeps its own files", store, err, folder)
                cross_device = True
        if temporary.exists():
            os.replace(temporary, target)
        written.append(target)
        weight_map.update({key: name for key in keys})
    for path in sources:
        if path not in written:
            path.unlink()
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    log.info(
        "%s: %d weight files, %d of them (%.1f MB) already in %s",
        folder,
        len(written),
        linked,
        linked_bytes / 1e6,
        store,
    )
    return {"files": len(written), "linked": linked, "linked_bytes": linked_bytes, "store": str(store)}
