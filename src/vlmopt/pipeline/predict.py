"""Pipeline stages: predicting, gathering and scoring."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from vlmopt.tables import merge_shards, read_predictions, score_rows, write_parquet, write_predictions

__all__ = ["predict_shard", "gather_predictions", "score_predictions"]


def _parse_scatteritem(item: str) -> tuple[int, int]:
    """'2-of-3' -> (1, 3): 0-based shard and shard count."""
    try:
        i, n = item.split("-of-")
        shard, n_shards = int(i) - 1, int(n)
    except ValueError as exc:
        raise ValueError(f"shard name {item!r} is not of the form '<i>-of-<n>'") from exc
    return shard, n_shards


def predict_shard(
    model_dir: str | Path,
    table: str | Path,
    dataset_root: str | Path,
    out: str | Path,
    *,
    task: str,
    shard: str,
    settings: dict[str, Any],
    task_settings: dict[str, Any] | None = None,
    device: str | None = None,
    chunk_rows: int | None = None,
) -> None:
    """Predict one shard (``'i-of-n'``) of a dataset split for ``task`` and write it as Parquet.

    ``task_settings`` are the similarity tasks' own (``templates`` for classification, ``k`` for
    retrieval re-ranking); they are recorded in the file's metadata like the generation settings.
    Launched by torchrun (``WORLD_SIZE`` > 1), the processes split the shard's rows and write the
    same file together (:mod:`vlmopt.distributed`), each on its own GPU. A single process runs on
    ``device`` (:func:`vlmopt.device.resolve_device`: the GPU where there is one; the CPU for a
    variant with runtime steps such as dynamic int8).

    Images are read batch by batch (``settings["num_workers"]`` DataLoader workers where given, else
    :func:`vlmopt.streaming.default_workers`). Every finished chunk of ``chunk_rows`` rows (default
    :data:`vlmopt.infer.CHUNK_ROWS`) is written to a hidden folder beside ``out``
    (:func:`vlmopt.chunks.chunk_folder`), so that a killed job, run again with the same model,
    table, settings and code, starts at its first unfinished chunk ("resuming shard at row N: K
    chunks done" in its log) and writes the file an uninterrupted run writes. Chunks written with
    anything else are set aside, never resumed (the log says what changed). The folder is removed
    once ``out`` is written.
    """
    from vlmopt import distributed
    from vlmopt.chunks import ChunkStore, chunk_folder, remove_chunk_folders
    from vlmopt.compress.saved import load_variant
    from vlmopt.data.schema import require_rows
    from vlmopt.device import model_device, place
    from vlmopt.infer import CHUNK_ROWS, INFERENCE_DEFAULTS, chunk_inputs, generate_kwargs, predict, shard_rows

    require_rows(table, "inference (inference.split)")
    shard_index, n_shards = _parse_scatteritem(shard)
    gen = generate_kwargs(settings)
    chunk_rows = int(chunk_rows or CHUNK_ROWS)
    num_workers = settings.get("num_workers")
    if distributed.launched():
        # One of torchrun's processes: the ranks split the shard's rows and rank 0 writes ``out``.
        distributed.predict_shard(
            model_dir,
            table,
            dataset_root,
            out,
            task=task,
            shard=(shard_index, n_shards),
            batch_size=settings["batch_size"],
            generate_kwargs=gen,
            max_error_fraction=settings.get("max_error_fraction", INFERENCE_DEFAULTS["max_error_fraction"]),
            task_settings=task_settings,
            device=device,
            chunk_rows=chunk_rows,
            num_workers=num_workers,
        )
        return
    loaded = load_variant(model_dir)
    place(loaded.model, device, model_dir=model_dir)
    dataset = pd.read_parquet(table)
    rows = shard_rows(len(dataset), shard_index, n_shards)
    inputs = chunk_inputs(
        model_dir,
        table,
        dataset,
        rows,
        task=task,
        prompt=loaded.adapter.prompts[task],
        generate_kwargs=gen,
        task_settings=task_settings,
        batch_size=settings["batch_size"],
        chunk_rows=chunk_rows,
        device=model_device(loaded.model).type,
    )
    df = predict(
        loaded,
        dataset,
        dataset_root,
        task,
        batch_size=settings["batch_size"],
        generate_kwargs=gen,
        shard=shard_index,
        n_shards=n_shards,
        max_error_fraction=settings.get("max_error_fraction", INFERENCE_DEFAULTS["max_error_fraction"]),
        task_settings=task_settings,
        num_workers=num_workers,
        chunk_rows=chunk_rows,
        chunks=ChunkStore(chunk_folder(out), inputs),
    )
    meta = {"generation": gen, "task": task, "family": loaded.family, "prompt": loaded.adapter.prompts[task]}
    if task_settings:
        meta["task_settings"] = task_settings
    write_predictions(df, out, meta)
    remove_chunk_folders(out)


def gather_predictions(
    shards: Iterable[str | Path], table: str | Path, out: str | Path, *, log_path: str | Path | None = None
) -> None:
    """Merge shard predictions in dataset order, refusing duplicates and gaps.

    ``log_path`` receives one line: what was merged, or why merging failed (the error is raised too).
    """
    shards = list(shards)
    try:
        frames, meta = [], {}
        for path in shards:
            df, meta = read_predictions(path)
            frames.append(df)
        write_predictions(merge_shards(frames, pd.read_parquet(table, columns=["sample_id"])), out, meta)
    except Exception as exc:
        if log_path is not None:
            Path(log_path).write_text(f"gather_predictions failed: {type(exc).__name__}: {exc}\n")
        raise
    if log_path is not None:
        Path(log_path).write_text(f"merged {len(shards)} shard(s) into {out}\n")


def score_predictions(
    predictions: str | Path, table: str | Path, out: str | Path, *, keys: dict[str, str], settings: Any
) -> dict[str, float]:
    """Score predictions against the dataset split on CPU (the task's :meth:`~vlmopt.tasks.base.Task.score`)
    and write long-format score rows."""
    from vlmopt.tasks import get_task

    preds, _ = read_predictions(predictions)
    data = pd.read_parquet(table)
    if set(preds["sample_id"]) != set(data["sample_id"]):
        raise ValueError(f"{predictions} does not cover exactly the samples of {table}")
    metrics = get_task(keys["task"]).score(preds, data, source=str(table))
    n_failed = int(preds["error"].notna().sum())
    write_parquet(score_rows(keys, metrics, n_samples=len(preds), n_failed=n_failed, settings=settings), out)
    return metrics
