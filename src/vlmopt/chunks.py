"""Finished chunks of a long job's output, kept beside it so that a killed job resumes where it stopped.

A job that writes one file at its end (an inference shard) keeps each finished chunk of its work
in a hidden folder beside that file (:func:`chunk_folder`)::

    .shard-1-of-2.parquet.chunks/
        state.json              {"fingerprint": "<sha256>", "inputs": {...}}
        chunk-00000.parquet     one Parquet file per finished chunk, columns as the job wrote them
        chunk-00001.parquet

``inputs`` is everything that determines the job's result (model folder digest, table, task,
settings, code digest), as JSON, and the fingerprint its sha256
(:func:`vlmopt.checkpoints.fingerprint`). :class:`ChunkStore` keeps the chunks of a folder only for
a job with the same fingerprint; a folder written with other inputs (or without a readable
``state.json``) is emptied, and the log names what changed. Every file is written atomically (a
temporary file, then a rename), so a kill leaves whole chunks only. The folder is not an output
of the job: the workflow does not see it, and the job removes it once its own output is written
(:func:`remove_chunk_folders`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vlmopt.checkpoints import canonical, changes, fingerprint
from vlmopt.tables import write_parquet

__all__ = ["ChunkStore", "chunk_folder", "chunk_folders", "remove_chunk_folders"]

log = logging.getLogger(__name__)

STATE = "state.json"
_CHUNK = re.compile(r"^chunk-(\d{5,})\.parquet$")


def chunk_folder(out: str | Path, part: str | None = None) -> Path:
    """Where the finished chunks of ``out`` are kept: ``.<name>.chunks`` beside it, or
    ``.<name>.chunks-<part>`` for the chunks of one part of it (one process of several)."""
    out = Path(out)
    return out.with_name(f".{out.name}.chunks" + (f"-{part}" if part else ""))


def chunk_folders(out: str | Path) -> list[Path]:
    """Every chunk folder of ``out`` (its own and its parts'), sorted."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.glob(f".{out.name}.chunks*") if p.is_dir())


def remove_chunk_folders(out: str | Path) -> None:
    """Remove every chunk folder of ``out`` (once ``out`` itself is written)."""
    for folder in chunk_folders(out):
        shutil.rmtree(folder, ignore_errors=True)


class ChunkStore:
    """The finished chunks of one job (or one part of it) in ``directory``, for a run with ``inputs``.

    Opening the store keeps the chunks already there only when they were written with the same
    inputs; otherwise they are discarded with a warning naming the inputs that differ. Chunks are
    dicts of equally long column lists (plain Python values: numbers, strings, None, lists).
    """

    def __init__(self, directory: str | Path, inputs: Mapping[str, Any]):
        self.directory = Path(directory)
        self.inputs = canonical(inputs)
        self.fingerprint = fingerprint(inputs)
        self._open()

    def __repr__(self) -> str:
        return f"ChunkStore({str(self.directory)!r}, {len(self.done())} chunks)"

    def _open(self) -> None:
        if self.directory.exists():
            try:
                state = json.loads((self.directory / STATE).read_text())
            except (OSError, ValueError):
                state = None
            if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
                n = len(self.done())
                if not isinstance(state, dict) or not isinstance(state.get("inputs"), Mapping):
                    reason = "its state.json is missing or unreadable"
                else:
                    diff = changes(state["inputs"], self.inputs)
                    reason = "they were written with other inputs (" + ("; ".join(diff) or "fingerprint differs") + ")"
                if n:
                    log.warning("discarding %d finished chunk(s) in %s: %s", n, self.directory, reason)
                shutil.rmtree(self.directory)
        if not self.directory.exists():
            self.directory.mkdir(parents=True)
            state = {"fingerprint": self.fingerprint, "inputs": self.inputs}
            tmp = self.directory / f".{STATE}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
            os.replace(tmp, self.directory / STATE)

    def path(self, index: int) -> Path:
        """The file of chunk ``index``."""
        return self.directory / f"chunk-{index:05d}.parquet"

    def done(self) -> list[int]:
        """The indices of the chunks written so far, ascending."""
        if not self.directory.is_dir():
            return []
        found = (_CHUNK.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def read(self, index: int) -> dict[str, list] | None:
        """Chunk ``index``'s columns, None (with a warning) where its file cannot be read."""
        try:
            return pq.read_table(self.path(index)).to_pydict()
        except (OSError, pa.ArrowException) as exc:
            log.warning("chunk %d in %s is unreadable, it is predicted again: %s", index, self.directory, exc)
            return None

    def write(self, index: int, columns: Mapping[str, list]) -> Path:
        """Write chunk ``index`` (atomically)."""
        return write_parquet(pa.Table.from_pydict(dict(columns)), self.path(index))

    def remove(self) -> None:
        """Remove the folder and every chunk in it."""
        shutil.rmtree(self.directory, ignore_errors=True)
