"""One inference job on several GPUs of a node: torchrun processes split the job's shard by rows.

``inference.processes: N`` (N > 1) makes the infer job launch its prediction through torchrun
(:func:`launch_predict_shard`)::

    python -m torch.distributed.run --standalone --nproc-per-node N -m vlmopt.cli infer MODEL ...

Every process (rank) sees ``WORLD_SIZE`` > 1 in its environment, and
:func:`vlmopt.pipeline.predict_shard` hands the work to :func:`predict_shard`: the job's shard
(``'i-of-n'``, rows from :func:`vlmopt.infer.shard_rows`) is split again, contiguously, over the
ranks with the same function; each rank loads the variant (:func:`vlmopt.compress.saved.load_variant`)
onto ``cuda:LOCAL_RANK`` (the CPU without CUDA, or for a variant with dynamic int8 steps, which run
on the CPU only), predicts its rows and writes them to a hidden part file beside the output. After
a barrier, rank 0 merges the parts in dataset order, refusing duplicates and gaps
(:func:`vlmopt.tables.merge_shards`), applies ``max_error_fraction`` to the whole shard as a
single process would, writes the output atomically with the same metadata, and removes the parts.
Each rank also keeps its finished chunks in a folder of its own beside the output
(:mod:`vlmopt.chunks`), so that a killed job run again with the same number of processes resumes
every rank at its first unfinished chunk; rank 0 removes those folders once the output is written.
Data parallel inference changes no prediction: generation reads only a sample's own row, and the
similarity tasks score each row against the whole split, as a single process does.

The process group is gloo on the CPU and nccl on CUDA, with a timeout of
``VLMOPT_DISTRIBUTED_TIMEOUT`` seconds (default 3600: the longest a rank waits at the barrier for
the slowest one). A rank that raises exits non-zero; torchrun then stops the other ranks and exits
non-zero itself, with the rank's traceback in the output (the entry point is wrapped in torch's
``record``, so torchrun's summary names the failing rank and its error).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["DEFAULT_TIMEOUT_S", "Rank", "launch_predict_shard", "launched", "part_path", "predict_shard"]

log = logging.getLogger(__name__)

#: Seconds a rank waits for the others (at the barrier) before the job fails; ``VLMOPT_DISTRIBUTED_TIMEOUT``.
DEFAULT_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Rank:
    """This process's place in the torchrun job."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> Rank:
        missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k not in os.environ]
        if missing:
            raise RuntimeError(f"not launched by torchrun: {', '.join(missing)} not set in the environment")
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))


def launched() -> bool:
    """Whether this process is one of several that torchrun started (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError as exc:
        raise RuntimeError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from exc


def part_path(out: str | Path, rank: int, world_size: int) -> Path:
    """Where ``rank`` writes its part of the output ``out`` (hidden, beside it)."""
    out = Path(out)
    return out.with_name(f".{out.name}.part-{rank + 1}-of-{world_size}.parquet")


def _all_parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.part-*-of-*.parquet"))


def _timeout() -> timedelta:
    text = os.environ.get("VLMOPT_DISTRIBUTED_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError as exc:
        raise RuntimeError(f"VLMOPT_DISTRIBUTED_TIMEOUT must be a number of seconds, got {text!r}") from exc
    if seconds <= 0:
        raise RuntimeError(f"VLMOPT_DISTRIBUTED_TIMEOUT must be positive, got {text!r}")
    return timedelta(seconds=seconds)


def _device(me: Rank, model_dir: str | Path, setting: str | None = None):
    """``cuda:LOCAL_RANK`` where the job runs on CUDA (``VLMOPT_DEVICE``, :mod:`vlmopt.device`) and
    the variant can, else the CPU."""
    import torch

    from vlmopt.device import resolve_device, variant_cpu_reason

    if resolve_device(setting).type == "cpu":
        return torch.device("cpu")
    reason = variant_cpu_reason(model_dir)
    if reason:
        log.info("rank %d runs on the CPU: %s", me.rank, reason)
        return torch.device("cpu")
    n_gpus = torch.cuda.device_count()
    if me.local_rank >= n_gpus:
        raise RuntimeError(
            f"local rank {me.local_rank} has no GPU: {n_gpus} visible for {me.world_size} processes; "
            f"set inference.processes to at most {n_gpus} (and the infer rule's gpu resource to match)"
        )
    return torch.device("cuda", me.local_rank)


def predict_shard(
    model_dir: str | Path,
    table: str | Path,
    dataset_root: str | Path,
    out: str | Path,
    *,
    task: str,
    shard: tuple[int, int],
    batch_size: int,
    generate_kwargs: dict[str, Any],
    max_error_fraction: float,
    task_settings: dict[str, Any] | None = None,
    device: str | None = None,
    chunk_rows: int | None = None,
    num_workers: int | None = None,
) -> None:
    """This rank's part of :func:`vlmopt.pipeline.predict_shard` (``shard``: 0-based index, count).

    Every rank of the torchrun job calls it with the same arguments; rank 0 writes ``out``. Each
    rank keeps its finished chunks (``chunk_rows`` rows each, default
    :data:`vlmopt.infer.CHUNK_ROWS`) in its own folder beside ``out``
    (:func:`vlmopt.chunks.chunk_folder` with part ``<rank + 1>-of-<world size>``), so that a killed
    job resumes each rank at its first unfinished chunk; rank 0 removes every chunk folder of
    ``out`` once ``out`` is written.
    """
    from torch.distributed.elastic.multiprocessing.errors import record

    record(_predict_shard)(
        model_dir,
        table,
        dataset_root,
        Path(out),
        task=task,
        shard=shard,
        batch_size=batch_size,
        generate_kwargs=generate_kwargs,
        max_error_fraction=max_error_fraction,
        task_settings=task_settings,
        device=device,
        chunk_rows=chunk_rows,
        num_workers=num_workers,
    )


def _predict_shard(
    model_dir: str | Path,
    table: str | Path,
    dataset_root: str | Path,
    out: Path,
    *,
    task: str,
    shard: tuple[int, int],
    batch_size: int,
    generate_kwargs: dict[str, Any],
    max_error_fraction: float,
    task_settings: dict[str, Any] | None,
    device: str | None,
    chunk_rows: int | None = None,
    num_workers: int | None = None,
) -> None:
    import torch.distributed as dist

    from vlmopt.chunks import ChunkStore, chunk_folder
    from vlmopt.compress.saved import load_variant
    from vlmopt.infer import CHUNK_ROWS, chunk_inputs, shard_rows
    from vlmopt.tables import write_predictions

    me = Rank.from_env()
    device = _device(me, model_dir, device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        rank=me.rank,
        world_size=me.world_size,
        timeout=_timeout(),
        device_id=device if device.type == "cuda" else None,
    )
    part = part_path(out, me.rank, me.world_size)
    try:
        dataset = pd.read_parquet(table)
        job = shard_rows(len(dataset), *shard)
        own = shard_rows(len(job), me.rank, me.world_size)
        rows = job[own.start : own.stop]
        log.info(
            "rank %d of %d (%s, %s): shard %d-of-%d rows %d-%d of %d in the split, this rank rows %d-%d (%d rows)",
            me.rank,
            me.world_size,
            device,
            backend,
            shard[0] + 1,
            shard[1],
            job.start,
            job.stop - 1,
            len(dataset),
            rows.start,
            rows.stop - 1,
            len(rows),
        )
        loaded = load_variant(model_dir)
        loaded.model.to(device)
        chunk_rows = int(chunk_rows or CHUNK_ROWS)
        inputs = chunk_inputs(
            model_dir,
            table,
            dataset,
            rows,
            task=task,
            prompt=loaded.adapter.prompts[task],
            generate_kwargs=generate_kwargs,
            task_settings=task_settings,
            batch_size=batch_size,
            chunk_rows=chunk_rows,
            device=device.type,
        )
        chunks = ChunkStore(chunk_folder(out, f"{me.rank + 1}-of-{me.world_size}"), inputs)
        df = _predict_rows(
            loaded,
            dataset,
            dataset_root,
            task,
            rows,
            batch_size=batch_size,
            generate_kwargs=generate_kwargs,
            task_settings=task_settings,
            progress=me.rank == 0,
            num_workers=num_workers,
            chunk_rows=chunk_rows,
            chunks=chunks,
        )
        write_predictions(df, part, {"rank": me.rank, "world_size": me.world_size, "rows": [rows.start, rows.stop]})
        log.info("rank %d of %d: wrote %d predictions to %s", me.rank, me.world_size, len(df), part)
        dist.barrier()
        if me.rank == 0:
            # The metadata of a single process's file (vlmopt.pipeline.predict_shard).
            meta = {
                "generation": generate_kwargs,
                "task": task,
                "family": loaded.family,
                "prompt": loaded.adapter.prompts[task],
            }
            if task_settings:
                meta["task_settings"] = task_settings
            _merge(out, dataset.iloc[job.start : job.stop], me.world_size, meta, max_error_fraction)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    finally:
        dist.destroy_process_group()


def _predict_rows(
    loaded: Any,
    dataset: pd.DataFrame,
    dataset_root: str | Path,
    task: str,
    rows: range,
    *,
    batch_size: int,
    generate_kwargs: dict[str, Any],
    task_settings: dict[str, Any] | None,
    progress: bool,
    num_workers: int | None = None,
    chunk_rows: int | None = None,
    chunks: Any = None,
) -> pd.DataFrame:
    """Predictions of ``dataset``'s ``rows`` (a contiguous range), as :func:`vlmopt.infer.predict` makes them
    (finished chunks go to, and are resumed from, the store ``chunks``).

    Failed samples are recorded but not counted here: the whole shard's share is checked at the
    merge, as a single process checks it.
    """
    from vlmopt import infer

    if rows.start >= rows.stop:
        # More ranks than rows: nothing to predict here (the part is empty, the merge still checks).
        return pd.DataFrame({c: pd.Series([], dtype="string") for c in ("sample_id", "prediction", "error")})
    # The whole split is the context (similarity scores are against every class or caption); only
    # this rank's rows are predicted.
    return infer.predict(
        loaded,
        dataset,
        dataset_root,
        task,
        batch_size=batch_size,
        generate_kwargs=generate_kwargs,
        max_error_fraction=1.0,
        progress=progress,
        task_settings=task_settings,
        rows=rows,
        num_workers=num_workers,
        chunk_rows=chunk_rows or infer.CHUNK_ROWS,
        chunks=chunks,
    )


def _merge(out: Path, job_rows: pd.DataFrame, world_size: int, meta: dict[str, Any], max_error_fraction: float) -> None:
    """Rank 0: the parts in dataset order, checked, written to ``out``; then the parts are removed."""
    from vlmopt.chunks import remove_chunk_folders
    from vlmopt.infer import _check_failures
    from vlmopt.tables import merge_shards, read_predictions, write_predictions

    try:
        frames = []
        for rank in range(world_size):
            path = part_path(out, rank, world_size)
            if not path.is_file():
                raise RuntimeError(f"rank {rank} wrote no predictions: {path} is missing after the barrier")
            frames.append(read_predictions(path)[0])
        merged = merge_shards(frames, job_rows)
        _check_failures([e if isinstance(e, str) else None for e in merged["error"]], max_error_fraction)
        write_predictions(merged, out, meta)
        remove_chunk_folders(out)
    finally:
        # Every rank has written its part (or failed) by now; parts of earlier, killed runs go too.
        for path in _all_parts(out):
            path.unlink(missing_ok=True)
    log.info("rank 0: merged %d parts (%d predictions) into %s", world_size, len(merged), out)


def launch_predict_shard(
    model_dir: str | Path,
    table: str | Path,
    dataset_root: str | Path,
    out: str | Path,
    *,
    task: str,
    shard: str,
    settings: dict[str, Any],
    task_settings: dict[str, Any] | None = None,
    processes: int,
    threads: int | None = None,
) -> None:
    """Run ``vlmopt infer`` for one shard under torchrun with ``processes`` processes on this node.

    The processes share ``threads`` CPU threads (``OMP_NUM_THREADS`` each: threads // processes,
    at least 1). Their output goes to this process's stderr (the job's log, after
    :func:`vlmopt.pipeline.start_job`); a failure raises with the exit code.
    """
    if int(processes) < 2:
        raise ValueError(f"launch_predict_shard needs at least 2 processes, got {processes}")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(int(processes)),
        "-m",
        "vlmopt.cli",
        "infer",
        str(model_dir),
        "--table",
        str(table),
        "--dataset-root",
        str(dataset_root),
        "--task",
        task,
        "--shard",
        shard,
        "--out",
        str(out),
        "--settings",
        json.dumps(settings, sort_keys=True),
        "--task-settings",
        json.dumps(task_settings or {}, sort_keys=True),
    ]
    env = dict(os.environ)
    if threads is not None:
        per_process = str(max(1, int(threads) // int(processes)))
        env.update(OMP_NUM_THREADS=per_process, MKL_NUM_THREADS=per_process)
    log.info("running %d processes: %s", processes, shlex.join(command))
    stream = _log_stream()
    result = subprocess.run(command, env=env, stdout=stream, stderr=subprocess.STDOUT if stream else None, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"inference of shard {shard} with {processes} processes (torchrun) failed with exit code "
            f"{result.returncode}; the failing rank's error is in the output above"
        )


def _log_stream():
    """This process's stderr where it is a real file (the job's log), flushed; None to inherit."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return sys.stderr
