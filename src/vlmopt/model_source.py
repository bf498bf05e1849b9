"""Where a model comes from: ``tiny:<family>``, a local folder, or a hub id (no torch imported).

A hub id is ``name`` or ``owner/name``. A source that starts with ``/``, ``./``, ``../`` or ``~``,
or has more than one ``/``, is a local folder, and so is any other source that names an existing
folder (as transformers reads it). A local folder that does not exist is an error naming it, at
planning time, instead of a malformed hub id or a failed connection when the model is loaded.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TINY_PREFIX", "check_source", "source_kind"]

TINY_PREFIX = "tiny:"


def source_kind(source: str) -> str:
    """``"tiny"``, ``"folder"`` or ``"hub"``."""
    if source.startswith(TINY_PREFIX):
        return "tiny"
    if (
        source.startswith(("/", "./", "../", "~"))
        or source in (".", "..")
        or source.count("/") > 1
        or "\\" in source
        or Path(source).expanduser().is_dir()
    ):
        return "folder"
    return "hub"


def check_source(source: str) -> None:
    """Raise FileNotFoundError for a local folder that does not exist or holds no ``config.json``."""
    if source_kind(source) != "folder":
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"local model folder {source!r} does not exist ({path.resolve()})")
    if not path.is_dir():
        raise FileNotFoundError(f"local model folder {source!r} is a file, not a folder")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"local model folder {source!r} holds no config.json: not a saved model folder")
