"""What a study runs: its evaluations, its profiling and sweep jobs, and the params they carry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmopt.study.sweep import sweep_points

__all__ = [
    "PROFILING_ENABLED",
    "Evaluation",
    "StudyError",
    "canonical",
    "evaluations",
    "profiled",
    "shard_count",
    "swept",
]


class StudyError(ValueError):
    """A study file that is well-formed but inconsistent; the message names the key."""


@dataclass(frozen=True, order=True)
class Evaluation:
    model: str
    ft: str
    variant: str
    task: str
    dataset: str


def shard_count(rows: int, shard_size: int) -> int:
    """Inference jobs for a split of ``rows`` rows at ``shard_size`` rows each (at least one)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    return max(1, -(-rows // shard_size))


def canonical(value: Any) -> Any:
    """``value`` with every mapping's keys sorted, recursively (lists keep their order).

    Snakemake decides that a job must rerun when its params differ from the recorded ones, and it
    compares them as written, key order included; canonical params make a study file whose keys
    were merely reordered (or rewritten by a YAML dumper) rerun nothing.
    """
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def evaluations(config: dict[str, Any]) -> list[Evaluation]:
    """Every (model, ft, variant, task, dataset) the study evaluates, sorted and without repeats."""
    out: set[Evaluation] = set()
    for run in config.get("runs") or []:
        variants = sorted(config["variants"]) if run["variants"] == "all" else run["variants"]
        for model in run["models"]:
            for ft in run["finetune"]:
                for variant in variants:
                    for task, dataset in run["tasks"].items():
                        out.add(Evaluation(model, ft, variant, task, dataset))
    return sorted(out)


#: Whether a study profiles its variants where ``profiling.enabled`` is left out.
PROFILING_ENABLED = True


def profiled(config: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, str]]:
    """What to profile: (model, ft, variant) -> {task: the first dataset, by name, it is evaluated on}.

    One profiling job per variant measures each of its tasks; empty when ``profiling.enabled`` is false.
    """
    if not (config.get("profiling") or {}).get("enabled", PROFILING_ENABLED):
        return {}
    out: dict[tuple[str, str, str], dict[str, str]] = {}
    for e in evaluations(config):
        out.setdefault((e.model, e.ft, e.variant), {}).setdefault(e.task, e.dataset)
    return out


def swept(config: dict[str, Any]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """Sweep jobs: (model, ft, variant, point slug) -> ``{axis, value}``, one per point of ``profiling.sweep``
    for each profiled variant that ``profiling.sweep_on`` selects (its models, finetune, variants; each
    every one when left out). Empty without a sweep or when profiling is off."""
    section = config.get("profiling") or {}
    try:
        points = sweep_points(section.get("sweep"))
    except ValueError as exc:
        raise StudyError(str(exc)) from None
    if not points:
        return {}
    chosen = section.get("sweep_on") or {}
    out: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for model, ft, variant in profiled(config):
        picked = (("models", model), ("finetune", ft), ("variants", variant))
        if all(chosen.get(key) in (None, "all") or name in chosen[key] for key, name in picked):
            for p in points:
                out[(model, ft, variant, p.slug)] = {"axis": p.axis, "value": p.value}
    return out
