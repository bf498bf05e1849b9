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
from vlmopt.device import to_model_device
from vlmopt.models.base import LoadedModel
from vlmopt.models.encoding import text_ids
from vlmopt.tables import merge_shards
from vlmopt.tasks import get_task

__all__ = [
    "GENERATION_EXTRAS",
    "INFERENCE_DEFAULTS",
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


def generate_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """generate() keyword arguments from a task's generation settings; what they leave out comes
    from :data:`INFERENCE_DEFAULTS` (greedy, at most its ``max_new_tokens``)."""
    extra = {k: settings[k] for k in GENERATION_EXTRAS if k in settings}
    return generation_settings(
        max_new_tokens=settings.get("max_new_tokens", INFERENCE_DEFAULTS["max_new_tokens"]),
        num_beams=settings.get("num_beams", INFERENCE_DEFAULTS["num_beams"]),
        **extra,
    )


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
) -> pd.DataFrame:
    """Predict ``task`` for this shard's rows of ``dataset`` (or for ``rows``, a range of them, if given).

    Returns a frame with ``sample_id``, ``prediction`` and ``error`` (null when the sample
    succeeded) in dataset order; similarity tasks add ``scores`` (and ``scores_t2i`` for
    retrieval), see :func:`similarity_predictions`, whose ``settings`` are ``task_settings``. A
    sample whose image cannot be read is recorded with its error; if more than ``max_error_fraction``
    of the shard fails, a ``RuntimeError`` says so.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    spec = get_task(task)
    if task not in loaded.adapter.tasks:
        raise ValueError(f"family {loaded.family!r} cannot run task {task!r}; it runs {list(loaded.adapter.tasks)}")
    missing = [c for c in ("sample_id", "image", *spec.columns) if c not in dataset.columns]
    if missing:
        raise ValueError(f"dataset has no column(s) {missing} needed by task {task!r}")
    selected = list(rows if rows is not None else shard_rows(len(dataset), shard, n_shards))
    rows = dataset.iloc[selected].reset_index(drop=True)
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
    if spec.kind == "similarity":
        columns = similarity_predictions(
            loaded,
            dataset,
            dataset_root,
            task,
            rows=selected,
            images=images,
            batch_size=batch_size,
            settings=task_settings or {},
            progress=progress,
        )
        _check_failures(errors, max_error_fraction)
        return pd.DataFrame(
            {
                "sample_id": rows["sample_id"].astype(str),
                **columns,
                "error": pd.Series(errors, dtype="string"),
            }
        )
    bar = tqdm(total=len(images), desc=f"{task} shard {shard + 1}/{n_shards}", disable=not progress, unit="sample")
    for batch in batches:
        encoded = loaded.adapter.encode(loaded, [images[i] for i in batch], [prompts[i] for i in batch])
        encoded.inputs = to_model_device(encoded.inputs, loaded.model)
        texts = loaded.adapter.generate(loaded, encoded, **generate_kwargs)
        for i, text in zip(batch, texts, strict=True):
            predictions[i] = text.strip()
        bar.update(len(batch))
    bar.close()

    _check_failures(errors, max_error_fraction)
    return pd.DataFrame(
        {
            "sample_id": rows["sample_id"].astype(str),
            "prediction": pd.Series(predictions, dtype="string"),
            "error": pd.Series(errors, dtype="string"),
        }
    )


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
    images: dict[int, Any],
    batch_size: int,
    settings: dict[str, Any],
    progress: bool = True,
) -> dict[str, pd.Series]:
    """Image-text scores of the shard's ``rows`` (``images`` maps shard position -> opened image).

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
    part, are split between shards). ``prediction`` is the image's top caption.
    """
    adapter = loaded.adapter
    if get_task(task).kind != "similarity":
        raise ValueError(f"task {task!r} is not a similarity task")
    with torch.inference_mode():
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
            order = sorted(images)
            image_emb = _in_batches(lambda b: adapter.embed_images(loaded, [images[i] for i in b]), order, batch_size)
            sims = adapter.similarity(loaded, image_emb, class_emb)
            scores: list[list[float] | None] = [None] * len(rows)
            preds: list[str | None] = [None] * len(rows)
            for at, i in enumerate(order):
                scores[i] = sims[at].tolist()
                preds[i] = names[int(sims[at].argmax())]
            return {
                "prediction": pd.Series(preds, dtype="string"),
                "scores": pd.Series(scores, dtype=object),
            }
        from vlmopt.tasks import RetrievalTask

        texts, owners = RetrievalTask.texts(dataset)
        k = int(settings.get("k", 0)) if adapter.matches else 0
        text_emb = _in_batches(lambda b: adapter.embed_texts(loaded, b), texts, batch_size)
        # Global row -> opened image: the shard's own, plus (for re-ranking) every other image.
        opened = {rows[i]: im for i, im in images.items()}
        if k:
            for g, rel in enumerate(dataset["image"]):
                if g not in opened and g not in rows:
                    try:
                        opened[g] = open_image(dataset_root, rel)
                    except OSError:
                        pass  # That image's own shard records the error; here it just cannot be ranked.
        order = sorted(opened)
        embedded = _in_batches(lambda b: adapter.embed_images(loaded, [opened[g] for g in b]), order, batch_size)
        image_emb = embedded.new_full((len(dataset), *embedded.shape[1:]), float("nan"))
        image_emb[order] = embedded
        sims = adapter.similarity(loaded, image_emb, text_emb)
        sims[sims.isnan()] = float("-inf")
        n_images = len(order)
        scores, scores_t2i, preds = [None] * len(rows), [None] * len(rows), [None] * len(rows)
        if k:
            text_top = sims.topk(min(k, n_images), dim=0).indices  # (k, n_texts): each text's best images
            in_t2i = torch.zeros_like(sims, dtype=torch.bool)
            in_t2i.scatter_(0, text_top, True)
        bar = tqdm(total=len(images), desc=f"retrieval re-rank (k={k})", disable=not progress or not k, unit="image")
        for i in sorted(images):
            g = rows[i]
            row = sims[g]
            if not k:
                scores[i] = scores_t2i[i] = row.tolist()
            else:
                top = row.topk(min(k, len(texts))).indices
                wanted = torch.zeros(len(texts), dtype=torch.bool)
                wanted[top] = True
                wanted |= in_t2i[g]
                pairs = wanted.nonzero().flatten().tolist()
                itm = torch.full((len(texts),), float("nan"))
                itm[pairs] = _in_batches(
                    lambda b, g=g: adapter.match(loaded, [opened[g]] * len(b), [texts[j] for j in b]), pairs, batch_size
                ).cpu()
                i2t = torch.full((len(texts),), NOT_RERANKED)
                i2t[top] = itm[top] + row[top]
                t2i = torch.full((len(texts),), NOT_RERANKED)
                t2i[in_t2i[g]] = itm[in_t2i[g]] + row[in_t2i[g]]
                scores[i], scores_t2i[i] = i2t.tolist(), t2i.tolist()
                bar.update(1)
            preds[i] = texts[int(torch.tensor(scores[i]).argmax())]
        bar.close()
        return {
            "prediction": pd.Series(preds, dtype="string"),
            "scores": pd.Series(scores, dtype=object),
            "scores_t2i": pd.Series(scores_t2i, dtype=object),
        }
