"""Dataset rows encoded as model inputs for the tasks a family runs: calibration batches for GPTQ and AWQ.

The compression methods take ready batches (:class:`vlmopt.compress.calibration.Calibration`) and
know nothing of tasks; :func:`calibration_batches` builds those batches from a dataset table
through each task's prompts and targets and the family adapter's encoder. The caller wraps them::

    Calibration(*calibration_batches(loaded, table, root, n_samples=128, batch_size=8))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from vlmopt.streaming import image_batches
from vlmopt.tasks import get_task, served_tasks

__all__ = ["calibration_batches"]


def calibration_batches(
    loaded: Any,
    table: pd.DataFrame,
    dataset_root: str | Path,
    *,
    n_samples: int = 128,
    batch_size: int = 8,
    tasks: tuple[str, ...] | None = None,
    seed: int = 0,
) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """``n_samples`` rows drawn (seeded) from ``table``, batches encoded for each task in turn.

    Returns the model-ready batches (each a dict of tensors for ``model(**batch)``, without
    ``labels``) and a description of where they came from, for the manifest: ``n_samples``,
    ``batch_size``, ``tasks`` and ``seed``.

    ``tasks`` defaults to every task the family runs. Captioning examples pair the image with
    the task prompt and a reference caption; VQA examples with the question prompt and the most
    common answer, as in finetuning; retrieval and classification examples with a caption or
    the class prompt.
    """
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"calibration needs n_samples >= 1 and batch_size >= 1, got {n_samples}, {batch_size}")
    wanted = loaded.adapter.tasks if tasks is None else tasks
    requested = tasks is not None
    tasks = tuple(t for t in wanted if t in loaded.adapter.tasks)
    if not tasks:
        raise ValueError(f"family {loaded.family!r} supports none of the calibration tasks {list(wanted)}")
    # A table serves the tasks whose columns it has (a captioning set has no questions).
    served = served_tasks(tasks, table.columns, requested=requested)
    if not served:
        raise ValueError(
            f"the calibration table has the columns of none of the tasks {list(tasks)} (it has {sorted(table.columns)})"
        )
    tasks = served
    n = min(n_samples, len(table))
    if n == 0:
        raise ValueError("the calibration table is empty")
    order = torch.randperm(len(table), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    rows = table.iloc[sorted(order)].reset_index(drop=True)
    batches = []
    # Only the n drawn rows' images are read, a batch at a time (an image shared by rows once).
    for k, read in enumerate(image_batches(rows, dataset_root, batch_size)):
        unreadable = [error for error in read.errors if error is not None]
        if unreadable:
            raise OSError(f"a calibration image cannot be read: {unreadable[0]}")
        chunk, images = rows.iloc[read.rows], read.images
        task = tasks[k % len(tasks)]
        spec = get_task(task)
        encoded = loaded.adapter.encode(loaded, images, spec.prompts(chunk, loaded.adapter), spec.targets(chunk, 0))
        batch = {k: v for k, v in encoded.inputs.items() if k != "labels"}
        batches.append(batch)
    description = {"n_samples": n, "batch_size": batch_size, "tasks": list(tasks), "seed": seed}
    return batches, description
