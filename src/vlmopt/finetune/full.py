"""Full finetuning on a mix of tasks, resumable from its last checkpoint.

Every example of every task in the training split is seen once per epoch, in an order drawn
from ``seed`` and the epoch number alone, so a run resumed from a checkpoint at step k continues
with exactly the batches an uninterrupted run would have used. A checkpoint
(:mod:`vlmopt.checkpoints`, written atomically: temp folder, then rename) holds the model
(``model.safetensors``), the optimizer and RNG state (``trainer.pt``, read back with
``weights_only=True``: tensors and plain containers, no other pickled object) and ``state.json``:
the step and the run's fingerprint with its inputs (the settings other than ``checkpoint_every``,
the model's family and a sample of its weights, the tasks, a digest of the training table, and
what the caller adds: the pipeline adds the base model folder's digest and the code digest). Only
a run with the same fingerprint resumes it; another, or one past the run's end, is set aside
(``last.stale-<fingerprint>``) with a warning naming what differs, and training starts over.

Images are read as training needs them, never the whole split at once: each step's batch opens
its examples' images (an image that several examples of the batch share, one per task, once)
and preprocesses them together, through a :class:`torch.utils.data.DataLoader` whose worker
processes, on a GPU, prepare the next batches while the model trains on this one. Memory thus
depends on the batch size and the model, not on the size of the training split. An image
processor treats each image on its own, so a batch's pixel tensors are the ones preprocessing
the whole split would give, and training is bit-identical to preprocessing everything first.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vlmopt.checkpoints import load_tensors, resumable_step, save_tensors, write_checkpoint
from vlmopt.data.images import open_image
from vlmopt.device import model_device, to_model_device
from vlmopt.finetune.config import FullFinetuneConfig
from vlmopt.models.base import LoadedModel
from vlmopt.models.encoding import pixel_values
from vlmopt.streaming import default_workers
from vlmopt.tasks import get_task, served_tasks

__all__ = ["FullFinetuneConfig", "finetune"]

log = logging.getLogger(__name__)


def _examples(loaded: LoadedModel, df: pd.DataFrame, tasks: tuple[str, ...], epoch: int) -> list[tuple[int, str, str]]:
    """(row index, prompt, target) for every task and row, for one epoch: example ``i`` is of row
    ``i % len(df)`` and task ``tasks[i // len(df)]``."""
    out = []
    for name in tasks:
        task = get_task(name)
        if name not in loaded.adapter.tasks:
            raise ValueError(f"family {loaded.family!r} cannot be finetuned on task {name!r}")
        out += list(zip(range(len(df)), task.prompts(df, loaded.adapter), task.targets(df, epoch), strict=True))
    return out


class _Schedule:
    """The example indices of each training step: an epoch's examples in an order drawn from the
    seed and the epoch number alone (the same in every process that asks)."""

    def __init__(self, seed: int, n_examples: int, batch_size: int, steps_per_epoch: int) -> None:
        self.seed, self.n_examples, self.batch_size, self.steps_per_epoch = (
            seed,
            n_examples,
            batch_size,
            steps_per_epoch,
        )
        self._epoch: int | None = None
        self._order: torch.Tensor | None = None

    def order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.n_examples, generator=generator)
        return self._order

    def __call__(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        return self.order(epoch)[within * self.batch_size : (within + 1) * self.batch_size].tolist()


class _BatchImages(torch.utils.data.Dataset):
    """The images of one training step, read when asked for: ``self[step]`` is
    ``(step, rows, images)``, ``rows`` the table rows of the step's examples without repeats (in
    the order they first appear) and ``images`` those rows' images, preprocessed into one pixel
    tensor when ``processor`` is given, else decoded (for families that encode each image with
    its text)."""

    def __init__(
        self,
        root: str | Path,
        paths: pd.Series,
        schedule: _Schedule,
        steps: int,
        processor: Any | None,
        dtype: torch.dtype,
    ) -> None:
        self.root, self.schedule, self.steps, self.processor, self.dtype = root, schedule, steps, processor, dtype
        # The image paths only (a string column, Arrow-backed where pandas has pyarrow), not the table.
        self.paths = paths.astype(str).reset_index(drop=True)

    def __len__(self) -> int:
        return self.steps

    def rows(self, step: int) -> list[int]:
        return list(dict.fromkeys(i % len(self.paths) for i in self.schedule(step)))

    def __getitem__(self, step: int) -> tuple[int, list[int], Any]:
        rows = self.rows(step)
        images = [open_image(self.root, self.paths.iloc[r]) for r in rows]
        if self.processor is None:
            return step, rows, images
        return step, rows, pixel_values(self.processor, images, self.dtype)


def _as_is(item: Any) -> Any:
    return item


def _batch_loader(
    dataset: _BatchImages, start: int, total: int, workers: int, pin: bool
) -> torch.utils.data.DataLoader:
    """Steps ``start`` to ``total - 1`` of ``dataset``, in order, ``workers`` processes preparing
    the next ones. The loader draws its worker seed from a generator of its own, not torch's
    global one, so that loading leaves the training's random stream (dropout) as it was."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        sampler=range(start, total),
        num_workers=workers,
        collate_fn=_as_is,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(0),
        prefetch_factor=2 if workers else None,
    )


def _save_checkpoint(
    directory: Path, loaded: LoadedModel, optimizer: torch.optim.Optimizer, step: int, inputs: dict[str, Any]
) -> None:
    def write(folder: Path) -> None:
        state = {k: v.detach().contiguous().clone() for k, v in loaded.model.state_dict().items()}
        save_file(state, folder / "model.safetensors")
        rng = {"rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda_rng"] = torch.cuda.get_rng_state_all()
        save_tensors({"optimizer": optimizer.state_dict(), **rng}, folder / "trainer.pt")

    write_checkpoint(directory, step, inputs, write)


def _load_checkpoint(directory: Path, loaded: LoadedModel, optimizer: torch.optim.Optimizer) -> None:
    # The trainer file first: one that is refused leaves the model as it was.
    trainer = load_tensors(directory / "trainer.pt")
    loaded.model.load_state_dict(load_file(directory / "model.safetensors"), strict=False)
    optimizer.load_state_dict(trainer["optimizer"])
    torch.set_rng_state(trainer["rng"])
    if "cuda_rng" in trainer and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["cuda_rng"])


def _weights_digest(model: torch.nn.Module) -> str:
    """Digest of every parameter's name, shape and dtype and of its first and last 64 values.

    Cheap on any model size (the whole weights are not read), and it tells apart two models
    whose layout, initialisation or training differ, which change (nearly) every tensor.
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        sample = torch.cat([flat[:64], flat[-64:]]).cpu().contiguous()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _table_digest(train: pd.DataFrame) -> str:
    """Digest of the training table's content (its Parquet bytes; the tables are small)."""
    buffer = io.BytesIO()
    try:
        train.to_parquet(buffer, index=False)
    except (TypeError, ValueError, NotImplementedError, ImportError):  # pyarrow's errors derive from these
        buffer = io.BytesIO(train.astype(str).to_csv(index=False).encode())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def training_tasks(loaded: LoadedModel, train: pd.DataFrame, requested: tuple[str, ...] | None) -> tuple[str, ...]:
    """The tasks trained on: those ``requested``, else the family's that the table serves.

    A requested task the table lacks columns for is an error naming them; with none requested,
    the family's ``train_tasks`` (else its tasks) that the table has every column of, the
    tasks trained only on request (real_vs_generated) only when nothing else is served.
    """
    if requested:
        for name in requested:
            missing = [c for c in get_task(name).columns if c not in train.columns]
            if missing:
                raise ValueError(
                    f"finetune task {name!r} needs column(s) {missing}; the table has {list(train.columns)}"
                )
        return tuple(requested)
    candidates = loaded.adapter.train_tasks or loaded.adapter.tasks
    tasks = served_tasks(candidates, train.columns)
    if not tasks:
        raise ValueError(
            f"the training table serves none of the tasks of family {loaded.family!r} {list(candidates)} "
            f"(it has columns {list(train.columns)})"
        )
    return tasks


def finetune(
    loaded: LoadedModel,
    train: pd.DataFrame,
    dataset_root: str | Path,
    config: FullFinetuneConfig,
    *,
    checkpoint_dir: str | Path,
    progress: bool = True,
    fingerprint_extra: Mapping[str, Any] | None = None,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Finetune ``loaded.model`` in place on ``train``; resume from ``checkpoint_dir/last`` if that
    checkpoint was written by a run with the same inputs.

    The inputs (the checkpoint's fingerprint, see the module docstring) are the settings, the
    model, the tasks and the table, plus ``fingerprint_extra``: JSON values the caller knows
    determine the run too (the pipeline passes the base model folder's digest and the code
    digest). A checkpoint of other inputs, or one past this run's end, is set aside with a
    warning and training starts from step 0.

    Each step reads and preprocesses its own batch's images; ``num_workers`` processes prepare
    the next batches meanwhile (None: :func:`vlmopt.streaming.default_workers`, i.e.
    ``$VLMOPT_LOADER_WORKERS`` or none on the CPU and up to 4 on a GPU, where batches also come in
    pinned memory). The weights do not depend on it.

    Returns a summary (steps, the step resumed from, seconds, first and last loss) for the run's
    log and record. A task of ``config.tasks`` that is not in the task registry is an error
    before anything is loaded.
    """
    for task in config.tasks or ():
        get_task(task)
    torch.manual_seed(config.seed)
    model = loaded.model
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    tasks = training_tasks(loaded, train, config.tasks)
    n_examples = len(train) * len(tasks)
    steps_per_epoch = -(-n_examples // config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    # Linear warm-up (at most a tenth of the run), then linear decay to a small floor.
    warmup = max(1, min(config.warmup_steps, total // 10))

    def scheduler_lr(step: int) -> float:
        return config.lr * min(1.0, (step + 1) / warmup) * max(0.0, 1 - step / total) + 1e-3 * config.lr

    # checkpoint_every only says how often progress is saved; the weights do not depend on it.
    settings = {k: v for k, v in asdict(config).items() if k != "checkpoint_every"}
    inputs = {
        "job": "full finetuning",
        "settings": settings,
        "model": {"family": loaded.family, "weights": _weights_digest(model)},
        "tasks": list(tasks),
        "train_table": _table_digest(train),
    }
    clash = sorted(set(inputs) & set(fingerprint_extra or {}))
    if clash:
        raise ValueError(f"fingerprint_extra may not replace the run's own inputs {clash}")
    inputs |= dict(fingerprint_extra or {})
    ckpt = Path(checkpoint_dir) / "last"
    step = resumable_step(ckpt, inputs, total) or 0
    if step:
        _load_checkpoint(ckpt, loaded, optimizer)
        log.info("resumed finetuning from %s at step %d of %d", ckpt, step, total)
    resumed_from = step
    model.train()
    losses: list[float] = []
    start = time.monotonic()
    bar = tqdm(total=total, initial=step, desc="finetune", disable=not progress, unit="step")
    schedule = _Schedule(config.seed, n_examples, config.batch_size, steps_per_epoch)
    # Families that encode the image with its text get decoded images, the others pixel tensors.
    processor = None if loaded.adapter.encodes_image_with_text else loaded.processor
    device = model_device(model)
    workers = default_workers(device) if num_workers is None else num_workers
    dataset = _BatchImages(dataset_root, train["image"], schedule, total, processor, model.dtype)
    loader = _batch_loader(dataset, step, total, workers, pin=device.type == "cuda")
    epoch_examples: tuple[int, list] | None = None
    for loaded_step, rows, images in loader:
        epoch = step // steps_per_epoch
        if epoch_examples is None or epoch_examples[0] != epoch:
            epoch_examples = (epoch, _examples(loaded, train, tasks, epoch))
        batch = [epoch_examples[1][i] for i in schedule(step)]
        position = {r: k for k, r in enumerate(rows)}
        if loaded_step != step or set(position) != {r for r, _, _ in batch}:
            raise RuntimeError(f"finetuning: the batch loaded for step {loaded_step} is not step {step}'s")
        which = [position[r] for r, _, _ in batch]
        prompts, targets = [p for _, p, _ in batch], [t for _, _, t in batch]
        if processor is None:
            encoded = loaded.adapter.encode(loaded, [images[k] for k in which], prompts, targets)
        else:
            encoded = loaded.adapter.encode(loaded, None, prompts, targets)
            # Moved before the examples pick their rows: one copy per image, overlapping on a GPU.
            encoded.inputs["pixel_values"] = images.to(device, non_blocking=True)[which]
        encoded.inputs = to_model_device(encoded.inputs, model)
        for group in optimizer.param_groups:
            group["lr"] = scheduler_lr(step)
        loss = loaded.adapter.loss(loaded, encoded)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % config.checkpoint_every == 0 and step < total:
            _save_checkpoint(ckpt, loaded, optimizer, step, inputs)
    bar.close()
    model.eval()
    return {
        "config": asdict(config),
        "steps": total,
        "resumed_from_step": resumed_from,
        "seconds": round(time.monotonic() - start, 2),
        "first_loss": losses[0] if losses else None,
        "last_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
    }
