"""Retrieval recall@k and zero-shot top-k accuracy from score matrices (numpy only).

Recall follows the BLIP / BLIP-2 evaluation (LAVIS ``_report_metrics``): image-to-text, an image
counts at k when any of its captions is among its k best-scored texts (``txt_r@k``); text-to-image,
a caption counts when its own image is among its k best-scored images (``img_r@k``); both in
percent, with their means and the overall mean ``r_mean``. Ties are broken by index order (a stable
sort on descending score), so the result is deterministic; a row of NaN (an image that could not
be read) is ranked last everywhere and never counts as a hit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["ranks_of", "retrieval_recall", "topk_accuracy"]


def ranks_of(scores: np.ndarray, targets: Sequence[Sequence[int]]) -> np.ndarray:
    """0-based rank, per row of ``scores``, of the best-placed of that row's target columns."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or len(targets) != scores.shape[0]:
        raise ValueError(f"scores must be (rows, candidates) with one target list per row, got {scores.shape}")
    scores = np.where(np.isnan(scores), -np.inf, scores)
    order = np.argsort(-scores, axis=1, kind="stable")
    position = np.empty_like(order)
    rows = np.arange(scores.shape[0])[:, None]
    position[rows, order] = np.arange(scores.shape[1])[None, :]
    ranks = np.empty(scores.shape[0], dtype=np.float64)
    for r, wanted in enumerate(targets):
        wanted = list(wanted)
        if not wanted:
            raise ValueError(f"row {r} has no target")
        ranks[r] = position[r, wanted].min()
    return ranks


def _recall(ranks: np.ndarray, k: int, valid: np.ndarray) -> float:
    return 100.0 * float(np.sum((ranks < k) & valid)) / len(ranks)


def retrieval_recall(
    i2t: np.ndarray,
    t2i: np.ndarray,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k both ways from ``i2t`` (images x texts) and ``t2i`` (texts x images) score matrices."""
    i2t, t2i = np.asarray(i2t, dtype=np.float64), np.asarray(t2i, dtype=np.float64)
    if i2t.shape != (len(img2txt), len(txt2img)) or t2i.shape != (len(txt2img), len(img2txt)):
        raise ValueError(
            f"score matrices {i2t.shape} and {t2i.shape} do not match {len(img2txt)} images and {len(txt2img)} texts"
        )
    image_ok = ~np.isnan(i2t).all(axis=1)
    txt_ranks = ranks_of(i2t, img2txt)
    img_ranks = ranks_of(t2i, [[j] for j in txt2img])
    text_ok = image_ok[np.asarray(txt2img, dtype=int)]
    out = {f"txt_r{k}": _recall(txt_ranks, k, image_ok) for k in ks}
    out.update({f"img_r{k}": _recall(img_ranks, k, text_ok) for k in ks})
    out["txt_r_mean"] = float(np.mean([out[f"txt_r{k}"] for k in ks]))
    out["img_r_mean"] = float(np.mean([out[f"img_r{k}"] for k in ks]))
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def topk_accuracy(scores: np.ndarray, labels: Sequence[int], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent: the true class (a column index) among a row's k best scores.

    ``k`` values not below the number of classes are left out (every sample would count).
    A row of NaN (a failed sample) counts as a miss.
    """
    scores = np.asarray(scores, dtype=np.float64)
    ranks = ranks_of(scores, [[int(y)] for y in labels])
    valid = ~np.isnan(scores).all(axis=1)
    return {f"top{k}": _recall(ranks, k, valid) for k in ks if k < scores.shape[1]}
