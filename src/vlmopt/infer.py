"""Batched, sharded generation whose results do not depend on batch size or shard count.

Greedy (or beam) decoding is deterministic for a given input, so the only way batching can leak
into results is padding. Prompts are therefore grouped by token length and every batch holds
prompts of one length only: no padding ever enters a forward pass. Shards are contiguous slices
of the dataset in its own order, and merged shards are re-sorted into that order.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from vlmopt.data.images import open_image
from vlmopt.models.base import LoadedModel
from vlmopt.models.encoding import text_ids
from vlmopt.tables import merge_shards
from vlmopt.tasks import get_task

__all__ = ["generation_settings", "merge_shards", "predict", "shard_rows"]

log = logging.getLogger(__name__)


def shard_rows(n_rows: int, shard: int, n_shards: int) -> range:
    """Contiguous row range of ``shard`` (0-based) out of ``n_shards``; shards cover all rows once."""
    if n_shards < 1 or not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is not in 0..{n_shards - 1}")
    size = math.ceil(n_rows / n_shards) if n_rows else 0
    return range(min(shard * size, n_rows), min((shard + 1) * size, n_rows))


def generation_settings(*, max_new_tokens: int, num_beams: int, **extra: Any) -> dict[str, Any]:
    """The generate() keyword arguments used for every prediction (recorded with the predictions)."""
    settings = {"max_new_tokens": int(max_new_tokens), "num_beams": int(num_beams), "do_sample": False}
    settings.update(extra)
    return settings


@torch.inference_mode()
def predict(
    loaded: LoadedModel,
    dataset: pd.DataFrame,
    dataset_root: str | Path,
    task: str,
    *,
    batch_size: int,
    generate_kwargs: dict[str, Any],
    shard: int = 0,
    n_shards: int = 1,
    max_error_fraction: float = 0.05,
    progress: bool = True,
) -> pd.DataFrame:
    """Predict ``task`` for this shard's rows of ``dataset``.

    Returns a frame with ``sample_id``, ``prediction`` and ``error`` (null when the sample
    succeeded) in dataset order. A sample whose image cannot be read is recorded with its error;
    if more than ``max_error_fraction`` of the shard fails, a ``RuntimeError`` says so.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    spec = get_task(task)
    if task not in loaded.adapter.tasks:
        raise ValueError(f"family {loaded.family!r} cannot run task {task!r}; it runs {list(loaded.adapter.tasks)}")
    missing = [c for c in ("sample_id", "image", *spec.columns) if c not in dataset.columns]
    if missing:
        raise ValueError(f"dataset has no column(s) {missing} needed by task {task!r}")
    rows = dataset.iloc[list(shard_rows(len(dataset), shard, n_shards))].reset_index(drop=True)
    prompts = spec.prompts(rows, loaded.adapter)
    predictions: list[str] = [""] * len(rows)
    errors: list[str | None] = [None] * len(rows)

    images: dict[int, Any] = {}
    for i, rel in enumerate(rows["image"]):
        try:
            images[i] = open_image(dataset_root, rel)
        except OSError as exc:
            errors[i] = str(exc)
            log.warning("%s: %s", rows["sample_id"][i], exc)

    # Group by prompt token length so that no batch needs padding.
    buckets: dict[int, list[int]] = defaultdict(list)
    for i in images:
        buckets[len(text_ids(loaded.tokenizer, prompts[i]))].append(i)
    batches = [idx[s : s + batch_size] for _, idx in sorted(buckets.items()) for s in range(0, len(idx), batch_size)]

    loaded.model.eval()
    bar = tqdm(total=len(images), desc=f"{task} shard {shard + 1}/{n_shards}", disable=not progress, unit="sample")
    for batch in batches:
        encoded = loaded.adapter.encode(loaded, [images[i] for i in batch], [prompts[i] for i in batch])
        texts = loaded.adapter.generate(loaded, encoded, **generate_kwargs)
        for i, text in zip(batch, texts, strict=True):
            predictions[i] = text.strip()
        bar.update(len(batch))
    bar.close()

    n_failed = sum(e is not None for e in errors)
    if rows.shape[0] and n_failed / rows.shape[0] > max_error_fraction:
        raise RuntimeError(
            f"{n_failed} of {rows.shape[0]} samples failed (more than {max_error_fraction:.0%}); "
            f"first error: {next(e for e in errors if e)}"
        )
    return pd.DataFrame(
        {
            "sample_id": rows["sample_id"].astype(str),
            "prediction": pd.Series(predictions, dtype="string"),
            "error": pd.Series(errors, dtype="string"),
        }
    )
