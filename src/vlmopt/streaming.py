"""Dataset images read batch by batch, so that memory follows the batch, never the split.

:func:`image_batches` reads the images of a table's rows through a
:class:`torch.utils.data.DataLoader`: each item of its dataset is one whole batch, its images
decoded (and, given ``preprocess``, turned into whatever the caller wants, such as tensors). With
``num_workers`` > 0, worker processes decode the next batches (``prefetch_factor`` each) while the
caller runs the current one; with 0 the batch is decoded in the calling process when it is asked
for. Either way at most a few batches of images exist at once. :func:`image_groups` does the same
for batches the caller has formed itself (rows grouped by prompt length, say).

Within a batch, an image that several rows share (VQA: many questions per image) is decoded once
and the rows share the object. A row whose image cannot be read (:func:`vlmopt.data.images.open_image`
raises ``OSError``) gets ``None`` for its image and the error's message; the other rows of its batch
are unaffected. Batches come back in the order asked for.

:func:`default_workers` is the number of workers a caller should use where it has no setting of
its own: ``$VLMOPT_LOADER_WORKERS`` if set, else none on the CPU (the model has every core) and, for
a model on a GPU, one fewer than the CPUs this process may run on, at most four.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from vlmopt.data.images import open_image

__all__ = ["ENV_WORKERS", "MAX_DEFAULT_WORKERS", "ImageBatch", "default_workers", "image_batches", "image_groups"]

#: Environment variable that sets the number of image-reading workers where a caller sets none.
ENV_WORKERS = "VLMOPT_LOADER_WORKERS"
#: The most workers :func:`default_workers` gives a GPU job.
MAX_DEFAULT_WORKERS = 4


class ImageBatch(NamedTuple):
    """One batch of rows and their images, in the order the rows were asked for."""

    #: The rows (positions in the table, as given).
    rows: list[int]
    #: Each row's decoded RGB image, or what ``preprocess`` made of it; None where it is unreadable.
    images: list[Any]
    #: Why each row's image could not be read; None where it was.
    errors: list[str | None]


def default_workers(device: str | torch.device | None = None) -> int:
    """Image-reading workers for a model on ``device``: ``$VLMOPT_LOADER_WORKERS`` if set, else 0 on the
    CPU and ``min(4, CPUs available - 1)`` on a GPU."""
    text = os.environ.get(ENV_WORKERS, "").strip()
    if text:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise ValueError(f"{ENV_WORKERS} must be a whole number of workers (0 or more), got {text!r}")
        return value
    if device is None or torch.device(device).type != "cuda":
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(0, min(MAX_DEFAULT_WORKERS, cpus - 1))


class _Groups(Dataset):
    """Item k: the images of the k-th group of rows, each distinct path decoded once.

    Rows and paths are held as flat numpy arrays (not Python lists) so that forked workers share
    them without copying.
    """

    def __init__(self, paths: Sequence[str], groups: list[list[int]], root: str | Path, preprocess: Callable | None):
        flat = [r for g in groups for r in g]
        self.rows = np.asarray(flat, dtype=np.int64)
        self.paths = np.asarray([str(paths[r]).encode() for r in flat], dtype=np.bytes_)
        self.bounds = np.cumsum([0, *(len(g) for g in groups)])
        self.root = str(root)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, k: int) -> ImageBatch:
        start, stop = int(self.bounds[k]), int(self.bounds[k + 1])
        decoded: dict[str, tuple[Any, str | None]] = {}
        paths = [bytes(p).decode() for p in self.paths[start:stop]]
        for rel in paths:
            if rel in decoded:
                continue
            try:
                image = open_image(self.root, rel)
            except OSError as exc:
                decoded[rel] = (None, str(exc))
                continue
            decoded[rel] = (self.preprocess(image) if self.preprocess is not None else image, None)
        return ImageBatch(
            [int(r) for r in self.rows[start:stop]], [decoded[p][0] for p in paths], [decoded[p][1] for p in paths]
        )


def _as_is(item: ImageBatch) -> ImageBatch:
    return item


def _paths(table: pd.DataFrame | Sequence[str]) -> Sequence[str]:
    if isinstance(table, pd.DataFrame):
        if "image" not in table.columns:
            raise ValueError(f"the table has no 'image' column (it has {sorted(table.columns)})")
        return table["image"].to_numpy()
    return table


def image_groups(
    table: pd.DataFrame | Sequence[str],
    root: str | Path,
    groups: Iterable[Sequence[int]],
    *,
    preprocess: Callable[[Any], Any] | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> Iterator[ImageBatch]:
    """One :class:`ImageBatch` per group of rows (positions in ``table``, whose ``image`` column holds
    paths relative to ``root``; or ``table`` is that column), in the groups' order.

    ``preprocess`` runs on each decoded image in the worker (it must be picklable where workers
    are spawned rather than forked). ``pin_memory`` pins the tensors of a batch (what
    ``preprocess`` returns) for faster copies to a GPU; it is ignored where torch sees no CUDA.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be 0 or more, got {num_workers}")
    groups = [list(g) for g in groups]
    if not groups:
        return
    dataset = _Groups(_paths(table), groups, root, preprocess)
    options: dict[str, Any] = {}
    if num_workers > 0:
        options["prefetch_factor"] = max(1, int(prefetch_factor))
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_as_is,
        pin_memory=bool(pin_memory) and torch.cuda.is_available(),
        **options,
    )
    yield from loader


def image_batches(
    table: pd.DataFrame | Sequence[str],
    root: str | Path,
    batch_size: int,
    *,
    rows: Sequence[int] | None = None,
    preprocess: Callable[[Any], Any] | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> Iterator[ImageBatch]:
    """``rows`` of ``table`` (default: all, in order) in batches of ``batch_size`` consecutive rows,
    each with its images (:func:`image_groups`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = list(range(len(table))) if rows is None else list(rows)
    yield from image_groups(
        table,
        root,
        (order[s : s + batch_size] for s in range(0, len(order), batch_size)),
        preprocess=preprocess,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
    )
