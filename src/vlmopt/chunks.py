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
``state.json``) is set aside, never resumed, and the log names what changed. Every file is written
atomically (a temporary file, then a rename), so a kill leaves whole chunks only. The folder is
not an output of the job: the workflow does not see it, and the job removes it (and any copy set
aside) once its own output is written (:func:`remove_chunk_folders`). Labeling keeps its chunks the
same way, in a work folder of its own, one group of chunks per split
(:func:`vlmopt.pipeline.label_dataset`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vlmopt.checkpoints import canonical, changes, fingerprint, read_state, set_aside
from vlmopt.tables import write_parquet

__all__ = ["ChunkStore", "chunk_folder", "chunk_folders", "remove_chunk_folders"]

log = logging.getLogger(__name__)

STATE = "state.json"
_CHUNK = re.compile(r"^(\w+?)-(\d{5,})\.parquet$")


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
    inputs; otherwise the folder is set aside as ``<directory>.stale-<fingerprint[:12]>``
    (:func:`vlmopt.checkpoints.set_aside`) with a warning naming the inputs that differ, never
    resumed (a folder holding no chunk is simply removed). Chunks are dicts of equally long column
    lists (plain Python values: numbers, strings, None, lists). A job whose work falls into several
    sequences of chunks (labeling: one per split) names each with ``group``: chunk ``index`` of
    group ``g`` is the file ``<g>-<index:05d>.parquet``. ``what`` names the job in log lines.
    """

    def __init__(self, directory: str | Path, inputs: Mapping[str, Any], *, what: str = "inference"):
        self.directory = Path(directory)
        self.inputs = canonical(inputs)
        self.fingerprint = fingerprint(inputs)
        self.what = what
        self._open()

    def __repr__(self) -> str:
        return f"ChunkStore({str(self.directory)!r})"

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if _CHUNK.match(p.name))

    def _open(self) -> None:
        if self.directory.exists():
            state = read_state(self.directory)
            if state is None or state.get("fingerprint") != self.fingerprint:
                if state is None or not isinstance(state.get("inputs"), Mapping):
                    reason = "its state.json is missing or unreadable"
                else:
                    diff = changes(state["inputs"], self.inputs)
                    reason = "it was written with other inputs (" + ("; ".join(diff) or "fingerprint differs") + ")"
                n = len(self._files())
                if n:
                    moved = set_aside(self.directory, state)
                    log.warning(
                        "%s: not resuming from %s: %s; set its %d chunk(s) aside as %s and starting over",
                        self.what,
                        self.directory,
                        reason,
                        n,
                        moved.name,
                    )
                else:
                    shutil.rmtree(self.directory)
        if not self.directory.exists():
            self.directory.mkdir(parents=True)
            state = {"fingerprint": self.fingerprint, "inputs": self.inputs}
            tmp = self.directory / f".{STATE}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
            os.replace(tmp, self.directory / STATE)

    def path(self, index: int, group: str = "chunk") -> Path:
        """The file of chunk ``index`` (of ``group``)."""
        return self.directory / f"{group}-{index:05d}.parquet"

    def done(self, group: str = "chunk") -> list[int]:
        """The indices of the chunks of ``group`` written so far, ascending."""
        found = (_CHUNK.match(p.name) for p in self._files())
        return sorted(int(m.group(2)) for m in found if m and m.group(1) == group)

    def read(
        self, index: int, group: str = "chunk", *, sample_ids: Sequence[str] | None = None
    ) -> dict[str, list] | None:
        """Chunk ``index``'s columns; None where it is not written, or (with a warning) where its file
        cannot be read or, given ``sample_ids``, holds other rows than those."""
        path = self.path(index, group)
        if not path.exists():
            return None
        try:
            columns = pq.read_table(path).to_pydict()
        except (OSError, pa.ArrowException) as exc:
            log.warning("%s: chunk %s is unreadable, it is done again: %s", self.what, path, exc)
            return None
        if sample_ids is not None and columns.get("sample_id") != [str(s) for s in sample_ids]:
            log.warning("%s: chunk %s holds other rows than expected, it is done again", self.what, path)
            return None
        return columns

    def write(
        self, index: int, columns: Mapping[str, list], group: str = "chunk", *, schema: pa.Schema | None = None
    ) -> Path:
        """Write chunk ``index`` (of ``group``; atomically), with ``schema`` where given (columns that
        may be all None need one)."""
        return write_parquet(pa.Table.from_pydict(dict(columns), schema=schema), self.path(index, group))

    def remove(self) -> None:
        """Remove the folder, every chunk in it, and the copies of it set aside."""
        shutil.rmtree(self.directory, ignore_errors=True)
        if self.directory.parent.is_dir():
            for stale in self.directory.parent.glob(f"{self.directory.name}.stale-*"):
                shutil.rmtree(stale, ignore_errors=True)
