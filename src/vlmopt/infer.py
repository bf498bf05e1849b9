"""Batched, sharded generation whose results do not depend on batch size or shard count.

Greedy (or beam) decoding is deterministic for a given input, so the only way batching can leak
into results is padding. Prompts are therefore grouped by token length and every batch holds
prompts of one length only: no padding ever enters a forward pass. Shards are contiguous slices
of the dataset in its own order, and merged shards are re-sorted into that order.

Images are read batch by batch as the batches run (:mod:`vlmopt.streaming`: a DataLoader whose
workers decode the next batches while the model runs the current one), so memory follows the
batch size and the model, never the size of the split. A shard's rows are worked through in
chunks of about :data:`CHUNK_ROWS` rows (whole batches); given a :class:`vlmopt.chunks.ChunkStore`,
:func:`predict` writes each finished chunk to it and, run again, predicts only the chunks it does
not hold yet (:func:`vlmopt.pipeline.predict_shard` keeps them beside the shard's output, so that
a killed job resumes where it stopped).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from vlmopt.device import model_device, to_model_device
from vlmopt.models.base import LoadedModel
from vlmopt.models.encoding import text_ids
from vlmopt.streaming import ImageBatch, default_workers, image_groups
from vlmopt.tables import merge_shards
from vlmopt.tasks import get_task

if TYPE_CHECKING:  # annotations only
    from vlmopt.chunks import ChunkStore

__all__ = [
    "CHUNK_ROWS",
    "CACHE_ENV",
    "GENERATION_EXTRAS",
    "INFERENCE_DEFAULTS",
    "cache_kwargs",
    "chunk_inputs",
    "generate_kwargs",
    "generation_settings",
    "merge_shards",
    "predict",
    "shard_rows",
    "similarity_predictions",
]

log = logging.getLogger(__name__)

#: The study's ``inference`` settings where it leaves them out: the split that is predicted and
#: scored, samples per forward pass, inference jobs per (model, variant, task), processes per job,
#: generated tokens at most, beams (1 = greedy), the retrieval re-ranking depth and the share of
#: unreadable samples tolerated per shard. The workflow's schema gives the same defaults.
INFERENCE_DEFAULTS: dict[str, Any] = {
    "split": "test",
    "batch_size": 16,
    "shards": 2,
    "processes": 1,
    "max_new_tokens": 20,
    "num_beams": 1,
    "retrieval_k": 128,
    "max_error_fraction": 0.05,
}

#: Rows per chunk of a shard (rounded up to whole batches): the unit :func:`predict` writes to a
#: chunk store, and at most what a killed job predicts again.
CHUNK_ROWS = 1024


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


#: generate() settings a study may set besides max_new_tokens and num_beams.
GENERATION_EXTRAS = ("length_penalty", "min_new_tokens", "repetition_penalty")


#: Environment variable choosing the KV cache of generation: auto, dynamic or static.
CACHE_ENV = "VLMOPT_CACHE"
CACHES = ("auto", "dynamic", "static")


def cache_kwargs(loaded: LoadedModel, setting: str | None = None) -> dict[str, Any]:
    """generate() keyword arguments for the KV cache that ``setting`` (else ``$VLMOPT_CACHE``, else
    ``auto``) chooses for ``loaded`` on its device: ``dynamic`` (transformers' default) or ``static``
    (``cache_implementation="static"``: the cache preallocated to its full length, fixed shapes for
    each decode step). ``auto`` is static on a GPU and dynamic on the CPU (see the README's
    measurements). A family whose ``generate`` does not work with it (:attr:`FamilyAdapter.static_cache`)
    keeps the dynamic cache. Both give the same predictions (tests on every generative family), so
    the choice reruns nothing and is not recorded with them.
    """
    text = (setting or os.environ.get(CACHE_ENV) or "auto").strip().lower()
    if text not in CACHES:
        raise ValueError(f"generation cache {text!r} is not one of {', '.join(CACHES)} ({CACHE_ENV} or the setting)")
    if text == "dynamic" or not loaded.adapter.static_cache:
        return {}
    if text == "auto" and model_device(loaded.model).type != "cuda":
        return {}
    return {"cache_implementation": "static"}


def cache_name(kwargs: dict[str, Any]) -> str:
    """``static`` or ``dynamic``, for logs and methods."""
    return "static" if kwargs.get("cache_implementation") == "static" else "dynamic"


def generate_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """generate() keyword arguments from a task's generation settings; what they leave out comes
    from :data:`INFERENCE_DEFAULTS` (greedy, at most its ``max_new_tokens``)."""
    extra = {k: settings[k] for k in GENERATION_EXTRAS if k in settings}
    return generation_settings(
        max_new_tokens=settings.get("max_new_tokens", INFERENCE_DEFAULTS["max_new_tokens"]),
        num_beams=settings.get("num_beams", INFERENCE_DEFAULTS["num_beams"]),
        **extra,
    )


@dataclass(frozen=True)
class _Unit:
    """Rows whose images are read together (at most a batch), in chunk ``chunk``; ``key`` is their
    batching group (the prompt length): a batch never mixes keys or chunks."""

    chunk: int
    key: int
    rows: list[int]


def _plan(groups: Iterable[tuple[int, list[int]]], chunk_rows: int) -> list[list[_Unit]]:
    """Consecutive ``(key, rows)`` groups cut into chunks of at least ``chunk_rows`` rows (the last may be short)."""
    chunks: list[list[_Unit]] = []
    current: list[_Unit] = []
    size = 0
    for key, rows in groups:
        current.append(_Unit(len(chunks), key, rows))
        size += len(rows)
        if size >= chunk_rows:
            chunks.append(current)
            current, size = [], 0
    if current:
        chunks.append(current)
    return chunks


def _chunk_rows(plan: list[list[_Unit]], chunk: int) -> list[int]:
    return sorted(r for unit in plan[chunk] for r in unit.rows)


def _rebatched(
    units: list[_Unit], stream: Iterator[ImageBatch], batch_size: int, on_error: Callable[[int, str], None]
) -> Iterator[tuple[int, list[int] | None, list[Any] | None]]:
    """Batches of readable rows out of the units' images: ``(chunk, rows, images)``, and
    ``(chunk, None, None)`` once a chunk's last batch has been handed out.

    Unreadable rows go to ``on_error`` (row, message) and leave no gap: a batch holds the next
    ``batch_size`` readable rows of its key and chunk, as a batch over the readable rows alone
    would, and only the last batch of a key (or chunk) is short.
    """
    rows: list[int] = []
    images: list[Any] = []
    current: tuple[int, int] | None = None
    for unit, got in zip(units, stream, strict=True):
        if current is not None and (unit.chunk, unit.key) != current:
            if rows:
                yield current[0], rows, images
                rows, images = [], []
            if unit.chunk != current[0]:
                yield current[0], None, None
        current = (unit.chunk, unit.key)
        for row, image, error in zip(got.rows, got.images, got.errors, strict=True):
            if error is not None:
                on_error(row, error)
            else:
                rows.append(row)
                images.append(image)
        while len(rows) >= batch_size:
            yield unit.chunk, rows[:batch_size], images[:batch_size]
            rows, images = rows[batch_size:], images[batch_size:]
    if current is not None:
        if rows:
            yield current[0], rows, images
        yield current[0], None, None


def _result_columns(task: str) -> tuple[str, ...]:
    """The per-row result columns of ``task`` (besides ``sample_id``), in file order."""
    if get_task(task).kind != "similarity":
        return ("prediction", "error")
    return ("prediction", "scores", "scores_t2i", "error") if task == "retrieval" else ("prediction", "scores", "error")


def _resumed(
    chunks: ChunkStore | None, plan: list[list[_Unit]], sample_ids: list[str], columns: tuple[str, ...]
) -> dict[int, dict[str, list]]:
    """The store's finished chunks that hold exactly the rows the plan gives them."""
    done: dict[int, dict[str, list]] = {}
    if chunks is None:
        return done
    for index in chunks.done():
        data = chunks.read(index) if index < len(plan) else None
        if data is None:
            continue
        rows = _chunk_rows(plan, index)
        if (
            data.get("row") != rows
            or data.get("sample_id") != [sample_ids[r] for r in rows]
            or any(len(data.get(c) or ()) != len(rows) for c in columns)
        ):
            log.warning(
                "chunk %d in %s does not hold the rows it should; it is predicted again", index, chunks.directory
            )
            continue
        done[index] = data
    if done:
        n_rows = sum(len(data["row"]) for data in done.values())
        log.info(
            "resuming shard at row %d: %d chunks done, %d of %d to go (%d of %d rows)",
            n_rows,
            len(done),
            len(plan) - len(done),
            len(plan),
            len(sample_ids) - n_rows,
            len(sample_ids),
        )
    return done


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
    max_error_fraction: float = INFERENCE_DEFAULTS["max_error_fraction"],
    progress: bool = True,
    task_settings: dict[str, Any] | None = None,
    rows: range | None = None,
    num_workers: int | None = None,
    chunk_rows: int = CHUNK_ROWS,
    chunks: ChunkStore | None = None,
) -> pd.DataFrame:
    """Predict ``task`` for this shard's rows of ``dataset`` (or for ``rows``, a range of them, if given).

    Returns a frame with ``sample_id``, ``prediction`` and ``error`` (null when the sample
    succeeded) in dataset order; similarity tasks add ``scores`` (and ``scores_t2i`` for
    retrieval), see :func:`similarity_predictions`, whose ``settings`` are ``task_settings``. A
    sample whose image cannot be read is recorded with its error; if more than ``max_error_fraction``
    of the shard fails, a ``RuntimeError`` says so.

    Images are read batch by batch (:func:`vlmopt.streaming.image_groups`) by ``num_workers``
    DataLoader workers (default :func:`vlmopt.streaming.default_workers`: none on the CPU, a few
    for a model on a GPU). The rows are worked through in chunks of at least ``chunk_rows`` rows
    (whole batches; for generation, whole batches of the prompt-length groups in turn). With
    ``chunks``, every finished chunk is written to that store, and chunks it already holds (for
    the same rows) are read from it instead of predicted again; the result is the same either way.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    spec = get_task(task)
    if task not in loaded.adapter.tasks:
        raise ValueError(f"family {loaded.family!r} cannot run task {task!r}; it runs {list(loaded.adapter.tasks)}")
    missing = [c for c in ("sample_id", "image", *spec.columns) if c not in dataset.columns]
    if missing:
        raise ValueError(f"dataset has no column(s) {missing} needed by task {task!r}")
    selected = list(rows if rows is not None else shard_rows(len(dataset), shard, n_shards))
    table = dataset.iloc[selected].reset_index(drop=True)
    sample_ids = table["sample_id"].astype(str)
    ids = sample_ids.tolist()
    similarity = spec.kind == "similarity"
    columns = _result_columns(task)
    results: dict[str, list] = {c: [None] * len(table) for c in columns}
    if not similarity:
        results["prediction"] = [""] * len(table)

    if similarity:
        prompts: list[str] = []
        groups = [(0, list(range(s, min(s + batch_size, len(table))))) for s in range(0, len(table), batch_size)]
    else:
        prompts = spec.prompts(table, loaded.adapter)
        # Group by prompt token length so that no batch needs padding.
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, prompt in enumerate(prompts):
            buckets[len(text_ids(loaded.tokenizer, prompt))].append(i)
        groups = [
            (n, idx[s : s + batch_size]) for n, idx in sorted(buckets.items()) for s in range(0, len(idx), batch_size)
        ]
    plan = _plan(groups, chunk_rows)
    done = _resumed(chunks, plan, ids, columns)
    for data in done.values():
        for column in columns:
            for row, value in zip(data["row"], data[column], strict=True):
                results[column][row] = value
    todo = [k for k in range(len(plan)) if k not in done]

    device = model_device(loaded.model)
    loader = {
        "num_workers": default_workers(device) if num_workers is None else int(num_workers),
        "pin_memory": device.type == "cuda",
    }
    n_todo = sum(len(u.rows) for k in todo for u in plan[k])
    bar = tqdm(total=n_todo, desc=f"{task} shard {shard + 1}/{n_shards}", disable=not progress, unit="sample")

    def failed(row: int, error: str) -> None:
        results["error"][row] = error
        log.warning("%s: %s", ids[row], error)
        bar.update(1)

    loaded.model.eval()
    if not todo:
        finished: Iterable[int] = ()
    elif similarity:
        finished = _similarity_chunks(
            loaded,
            dataset,
            dataset_root,
            task,
            selected,
            plan,
            todo,
            results,
            batch_size=batch_size,
            settings=task_settings or {},
            loader=loader,
            on_error=failed,
            bar=bar,
            progress=progress,
        )
    else:
        finished = _generated_chunks(
            loaded,
            table,
            dataset_root,
            prompts,
            plan,
            todo,
            results,
            batch_size=batch_size,
            generate_kwargs=generate_kwargs,
            loader=loader,
            on_error=failed,
            bar=bar,
        )
    for k in finished:
        if chunks is not None:
            rows_k = _chunk_rows(plan, k)
            chunks.write(
                k,
                {
                    "row": rows_k,
                    "sample_id": [ids[r] for r in rows_k],
                    **{c: [results[c][r] for r in rows_k] for c in columns},
                },
            )
    bar.close()

    _check_failures(results["error"], max_error_fraction)
    frame: dict[str, pd.Series] = {"sample_id": sample_ids}
    for column in columns:
        dtype = object if column.startswith("scores") else "string"
        frame[column] = pd.Series(results[column], dtype=dtype)
    return pd.DataFrame(frame)


def _generated_chunks(
    loaded: LoadedModel,
    table: pd.DataFrame,
    dataset_root: str | Path,
    prompts: list[str],
    plan: list[list[_Unit]],
    todo: list[int],
    results: dict[str, list],
    *,
    batch_size: int,
    generate_kwargs: dict[str, Any],
    loader: dict[str, Any],
    on_error: Callable[[int, str], None],
    bar: Any,
) -> Iterator[int]:
    """Generate the ``todo`` chunks' predictions into ``results``; yields each chunk once it is done."""
    cache = cache_kwargs(loaded)
    log.info("generation with the %s KV cache", cache_name(cache))
    units = [unit for k in todo for unit in plan[k]]
    stream = image_groups(table, dataset_root, [unit.rows for unit in units], **loader)
    for chunk, batch, images in _rebatched(units, stream, batch_size, on_error):
        if batch is None:
            yield chunk
            continue
        encoded = loaded.adapter.encode(loaded, images, [prompts[i] for i in batch])
        encoded.inputs = to_model_device(encoded.inputs, loaded.model)
        texts = loaded.adapter.generate(loaded, encoded, **generate_kwargs, **cache)
        for i, text in zip(batch, texts, strict=True):
            results["prediction"][i] = text.strip()
        bar.update(len(batch))


def chunk_inputs(
    model_dir: str | Path,
    table: str | Path,
    dataset: pd.DataFrame,
    rows: range,
    *,
    task: str,
    prompt: str,
    generate_kwargs: dict[str, Any],
    task_settings: dict[str, Any] | None,
    batch_size: int,
    chunk_rows: int,
    device: str,
) -> dict[str, Any]:
    """What a shard's chunks depend on, for its :class:`vlmopt.chunks.ChunkStore`: the model folder
    (:func:`vlmopt.checkpoints.folder_fingerprint`), the table file (path, rows, sha256), the rows,
    task, prompt, generation and task settings, the batching (batch size, chunk rows), the device
    type and the inference code (:func:`vlmopt.code_digest.stage_digest`)."""
    from vlmopt.checkpoints import folder_fingerprint
    from vlmopt.code_digest import stage_digest

    digest = hashlib.sha256()
    with open(table, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {
        "model": folder_fingerprint(model_dir),
        "table": {"path": str(Path(table).resolve()), "rows": len(dataset), "sha256": digest.hexdigest()},
        "rows": [rows.start, rows.stop],
        "task": task,
        "prompt": prompt,
        "generation": generate_kwargs,
        "task_settings": task_settings or {},
        "batch_size": int(batch_size),
        "chunk_rows": int(chunk_rows),
        "device": device,
        "code": stage_digest("infer"),
    }


def _check_failures(errors: list[str | None], max_error_fraction: float) -> None:
    n_failed = sum(e is not None for e in errors)
    if errors and n_failed / len(errors) > max_error_fraction:
        raise RuntimeError(
            f"{n_failed} of {len(errors)} samples failed (more than {max_error_fraction:.0%}); "
            f"first error: {next(e for e in errors if e)}"
        )


#: Score of a pair outside the re-ranked top k (as in the BLIP and BLIP-2 evaluation code).
NOT_RERANKED = -100.0


def _in_batches(fn: Any, items: list, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(items[s : s + batch_size]).float().cpu() for s in range(0, len(items), batch_size)])


def similarity_predictions(
    loaded: LoadedModel,
    dataset: pd.DataFrame,
    dataset_root: str | Path,
    task: str,
    *,
    rows: list[int],
    batch_size: int,
    settings: dict[str, Any],
    progress: bool = True,
    num_workers: int = 0,
) -> dict[str, pd.Series]:
    """Image-text scores of ``dataset``'s ``rows``: ``prediction``, ``scores`` (``scores_t2i``) and
    ``error`` (why a row's image could not be read), one entry per row.

    Images are read and embedded batch by batch (``num_workers`` reading them); only the
    embeddings are kept.

    Contrastive (ITC) scores come from the adapter's ``similarity``: the cosine of the image and
    text embeddings, or for BLIP-2 the largest cosine over the image's query outputs.

    Classification: ``scores`` holds the ITC score of the image with each class, classes in
    ascending label order, each class text the normalised mean of its templates' normalised
    embeddings (``settings["templates"]``, CLIP's prompt ensembling); ``prediction`` is the top
    class's name.

    Retrieval: the texts are every caption of the whole split in row order. ``scores`` is the
    image's row of the image-to-text score matrix and ``scores_t2i`` its column of the text-to-image
    matrix. Both are the ITC scores unless the family has a matching
    head and ``settings["k"]`` > 0: then, as in the BLIP / BLIP-2 evaluation, an image's k most
    similar texts score ITM logit + ITC and every other text scores -100, and in the other
    direction each text's k most similar images are re-ranked the same way. Re-ranking needs every
    image's embedding, so each shard embeds the whole split's images (the ITM passes, the costly
    part, are split between shards; a row's image is read again for its own). ``prediction`` is
    the image's top caption.
    """
    if get_task(task).kind != "similarity":
        raise ValueError(f"task {task!r} is not a similarity task")
    columns = _result_columns(task)
    results: dict[str, list] = {c: [None] * len(rows) for c in columns}
    plan = [[_Unit(0, 0, list(range(s, min(s + batch_size, len(rows))))) for s in range(0, len(rows), batch_size)]]

    def failed(row: int, error: str) -> None:
        results["error"][row] = error

    with torch.inference_mode():
        bar = tqdm(total=len(rows), desc=task, disable=not progress, unit="sample")
        for _ in _similarity_chunks(
            loaded,
            dataset,
            dataset_root,
            task,
            list(rows),
            plan if rows else [],
            [0] if rows else [],
            results,
            batch_size=batch_size,
            settings=settings,
            loader={"num_workers": num_workers, "pin_memory": False},
            on_error=failed,
            bar=bar,
            progress=progress,
        ):
            pass
        bar.close()
    return {c: pd.Series(results[c], dtype=object if c.startswith("scores") else "string") for c in columns}


def _similarity_chunks(
    loaded: LoadedModel,
    dataset: pd.DataFrame,
    dataset_root: str | Path,
    task: str,
    selected: list[int],
    plan: list[list[_Unit]],
    todo: list[int],
    results: dict[str, list],
    *,
    batch_size: int,
    settings: dict[str, Any],
    loader: dict[str, Any],
    on_error: Callable[[int, str], None],
    bar: Any,
    progress: bool,
) -> Iterator[int]:
    """Scores of the ``todo`` chunks of the rows ``selected`` (dataset rows; the plan's rows are
    positions in it) into ``results``; yields each chunk once it is done."""
    adapter = loaded.adapter
    # The one branch on a task's name outside vlmopt.tasks: classification and retrieval embed
    # different texts and rank them differently, and running the model is inference's job.
    if task == "classification":
        from vlmopt.tasks import DEFAULT_TEMPLATES, ClassificationTask

        _, names = ClassificationTask.classes(dataset)
        templates = tuple(settings.get("templates") or DEFAULT_TEMPLATES)
        per_class = ClassificationTask.class_texts(names, templates)
        flat = [t for texts in per_class for t in texts]
        text_emb = _in_batches(lambda b: adapter.embed_texts(loaded, b), flat, batch_size)
        class_emb = torch.nn.functional.normalize(text_emb.view(len(names), len(templates), -1).mean(1), dim=-1)
        units = [unit for k in todo for unit in plan[k]]
        stream = image_groups(dataset, dataset_root, [[selected[i] for i in u.rows] for u in units], **loader)
        position = {g: i for i, g in enumerate(selected)}
        embedded: list[torch.Tensor] = []
        order: list[int] = []
        for chunk, batch, images in _rebatched(
            units, stream, batch_size, lambda g, error: on_error(position[g], error)
        ):
            if batch is not None:
                embedded.append(adapter.embed_images(loaded, images).float().cpu())
                order += [position[g] for g in batch]
                bar.update(len(batch))
                continue
            if order:
                sims = adapter.similarity(loaded, torch.cat(embedded), class_emb)
                for at, i in enumerate(order):
                    results["scores"][i] = sims[at].tolist()
                    results["prediction"][i] = names[int(sims[at].argmax())]
            embedded, order = [], []
            yield chunk
        return

    from vlmopt.tasks import RetrievalTask

    texts, _ = RetrievalTask.texts(dataset)
    k = int(settings.get("k", 0)) if adapter.matches else 0
    text_emb = _in_batches(lambda b: adapter.embed_texts(loaded, b), texts, batch_size)
    position = {g: i for i, g in enumerate(selected)}
    own = sorted(selected[i] for chunk in todo for i in _chunk_rows(plan, chunk))
    pending = set(own)

    def noted(g: int, error: str) -> None:
        # Another shard's (or a finished chunk's) image: its own chunk records the error; here it
        # just cannot be ranked.
        if g in pending:
            on_error(position[g], error)

    # Every image of the split for re-ranking, else those of the chunks to do: embedded batch by batch.
    wanted = list(range(len(dataset))) if k else own
    units = [_Unit(0, 0, wanted[s : s + batch_size]) for s in range(0, len(wanted), batch_size)]
    stream = image_groups(dataset, dataset_root, [u.rows for u in units], **loader)
    embedded: list[torch.Tensor] = []
    order: list[int] = []
    for _, batch, images in _rebatched(units, stream, batch_size, noted):
        if batch is not None:
            embedded.append(adapter.embed_images(loaded, images).float().cpu())
            order += batch
            if not k:
                bar.update(len(batch))
    if not order:  # No image could be read: nothing to score.
        yield from todo
        return
    stacked = torch.cat(embedded)
    del embedded
    image_emb = stacked.new_full((len(dataset), *stacked.shape[1:]), float("nan"))
    image_emb[order] = stacked
    del stacked
    sims = adapter.similarity(loaded, image_emb, text_emb)
    sims[sims.isnan()] = float("-inf")
    readable = set(order)
    if not k:
        for chunk in todo:
            for i in _chunk_rows(plan, chunk):
                g = selected[i]
                if g in readable:
                    results["scores"][i] = results["scores_t2i"][i] = sims[g].tolist()
                    results["prediction"][i] = texts[int(torch.tensor(results["scores"][i]).argmax())]
            yield chunk
        return
    text_top = sims.topk(min(k, len(order)), dim=0).indices  # (k, n_texts): each text's best images
    in_t2i = torch.zeros_like(sims, dtype=torch.bool)
    in_t2i.scatter_(0, text_top, True)
    # The shard's readable images again, one chunk after the other, for their ITM passes.
    units = []
    for chunk in todo:
        ours = [selected[i] for i in _chunk_rows(plan, chunk) if selected[i] in readable]
        units += [_Unit(chunk, 0, ours[s : s + batch_size]) for s in range(0, len(ours), batch_size)] or [
            _Unit(chunk, 0, [])
        ]
    stream = image_groups(dataset, dataset_root, [u.rows for u in units], **loader)
    rerank = tqdm(
        total=sum(len(u.rows) for u in units), desc=f"retrieval re-rank (k={k})", disable=not progress, unit="image"
    )
    for chunk, batch, images in _rebatched(units, stream, batch_size, noted):
        if batch is None:
            yield chunk
            continue
        for g, image in zip(batch, images, strict=True):
            i, row = position[g], sims[g]
            top = row.topk(min(k, len(texts))).indices
            wanted_texts = torch.zeros(len(texts), dtype=torch.bool)
            wanted_texts[top] = True
            wanted_texts |= in_t2i[g]
            pairs = wanted_texts.nonzero().flatten().tolist()
            itm = torch.full((len(texts),), float("nan"))
            itm[pairs] = _in_batches(
                lambda b, image=image: adapter.match(loaded, [image] * len(b), [texts[j] for j in b]), pairs, batch_size
            ).cpu()
            i2t = torch.full((len(texts),), NOT_RERANKED)
            i2t[top] = itm[top] + row[top]
            t2i = torch.full((len(texts),), NOT_RERANKED)
            t2i[in_t2i[g]] = itm[in_t2i[g]] + row[in_t2i[g]]
            results["scores"][i], results["scores_t2i"][i] = i2t.tolist(), t2i.tolist()
            results["prediction"][i] = texts[int(torch.tensor(results["scores"][i]).argmax())]
            rerank.update(1)
            bar.update(1)
    rerank.close()
