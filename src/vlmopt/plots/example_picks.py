"""What the before/after examples (:mod:`vlmopt.plots.examples`) show: for each generative task and
dataset the configuration and variants to compare, the samples where their answers differ, and the
title that names the variants with their headline metric."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from vlmopt.plots.style import _tasks
from vlmopt.tasks import Task, get_task

__all__ = ["answers_by_sample", "pick_examples", "pick_samples", "selection_title"]


def _choose_variants(score: pd.Series, max_variants: int) -> list[str]:
    """Baseline, best, worst, then the rest from best to worst (unscored last), up to max_variants."""
    names = sorted(str(v) for v in score.index)
    compressed = [v for v in names if v != "baseline"]
    ranked = sorted((v for v in compressed if pd.notna(score[v])), key=lambda v: (-float(score[v]), v))
    worst = sorted(ranked, key=lambda v: (float(score[v]), v))[:1]
    order = (["baseline"] if "baseline" in names else []) + ranked[:1] + worst + ranked
    order += [v for v in compressed if pd.isna(score[v])]
    return list(dict.fromkeys(order))[:max_variants]


def pick_examples(summary: pd.DataFrame, max_variants: int = 3) -> list[dict[str, Any]]:
    """What to show for each generative task and dataset of ``summary``.

    The (model, ft) with the most variants on that task and dataset (ties: the first in sorted
    order), and its variants: "baseline" first when present, then the compressed variant with the
    best headline metric and the one with the worst (ties: sorted order), then
    the others from best to worst, variants without a metric last; distinct, at most
    ``max_variants``. Returns dicts ``{"task", "dataset", "model", "ft", "variants"}`` in task order
    (captioning, vqa, real_vs_generated), then by dataset.
    """
    if max_variants < 1:
        raise ValueError(f"max_variants must be at least 1, got {max_variants}")
    picked: list[dict[str, Any]] = []
    for task in (t for t in _tasks(summary) if get_task(t).generative):
        metric = get_task(task).headline
        rows = summary[summary["task"] == task]
        for dataset in sorted(rows["dataset"].dropna().unique(), key=str):
            here = rows[rows["dataset"] == dataset]
            counts = here.groupby(["model", "ft"])["variant"].nunique()
            if counts.empty:
                continue
            model, ft = min(counts.index, key=lambda k: (-int(counts[k]), str(k[0]), str(k[1])))
            config = here[(here["model"] == model) & (here["ft"] == ft)]
            score = pd.to_numeric(config[metric], errors="coerce").groupby(config["variant"]).mean()
            picked.append(
                {
                    "task": task,
                    "dataset": str(dataset),
                    "model": str(model),
                    "ft": str(ft),
                    "variants": _choose_variants(score, max_variants),
                }
            )
    return picked


def answers_by_sample(predictions: pd.DataFrame | None) -> dict[str, str | None]:
    """Sample id -> generated text; None where the prediction failed or is missing."""
    if predictions is None or predictions.empty:
        return {}
    error = predictions["error"] if "error" in predictions else pd.Series(None, index=predictions.index)
    out: dict[str, str | None] = {}
    for sid, text, err in zip(predictions["sample_id"], predictions["prediction"], error, strict=True):
        if str(sid) in out:
            continue
        ok = isinstance(text, str) and (err is None or bool(pd.isna(err)))
        out[str(sid)] = text if ok else None
    return out


def _key(task: Task, text: str | None) -> Any:
    """What two variants must share to count as giving the same answer (None: no answer)."""
    return None if text is None else task.answer_key(text)


def pick_samples(test: pd.DataFrame, predictions: Mapping[str, pd.DataFrame], task: str, n: int = 6) -> list[str]:
    """Sample ids to show: those where the variants' answers differ first, then the others, each in
    sample-id order; at most ``n``. Answers are compared as the task scores them
    (:meth:`~vlmopt.tasks.base.Task.answer_key`: normalised VQA answer, parsed real/generated class,
    caption text without case and spacing); a missing answer differs."""
    answers = [answers_by_sample(p) for p in predictions.values()]
    spec = get_task(task)
    differ: list[str] = []
    same: list[str] = []
    for sid in sorted({str(s) for s in test["sample_id"]}):
        if len(differ) >= n:
            break
        (differ if len({_key(spec, a.get(sid)) for a in answers}) > 1 else same).append(sid)
    return (differ + same)[: max(n, 0)]


def selection_title(sel: Mapping[str, Any], rows: pd.DataFrame, predictions: Mapping[str, pd.DataFrame]) -> str:
    """Task, dataset, model / ft and the shown variants with their headline metric, the best and the
    worst of the compressed variants named so."""
    task = str(sel["task"])
    metric, label = get_task(task).headline, get_task(task).headline_label
    rows = rows[rows["dataset"].astype(str) == str(sel["dataset"])]
    score = (
        pd.to_numeric(rows[metric], errors="coerce").groupby(rows["variant"].astype(str)).mean()
        if metric in rows
        else pd.Series(dtype=float)
    ).dropna()
    compressed = score[score.index != "baseline"]
    shown = []
    for variant in predictions:
        if variant not in score.index:
            shown.append(f"{variant} (no score)")
            continue
        role = ""
        if variant != "baseline" and len(compressed) > 1:
            if score[variant] == compressed.max():
                role = f" (best of {len(compressed)} compressed)"
            elif score[variant] == compressed.min():
                role = f" (worst of {len(compressed)})"
        shown.append(f"{variant} {score[variant]:.3g}{role}")
    return f"{task} on {sel['dataset']}, {sel['model']} / {sel['ft']}. {label}: {'; '.join(shown)}"
