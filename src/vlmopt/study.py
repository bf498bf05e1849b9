"""A study file: validation beyond the JSON Schema, and expansion of runs into evaluations.

The JSON Schema (workflow/schemas/config.schema.yaml) checks keys, types and values; this module
checks what a schema cannot: that every slug a run names is defined, that tasks meet datasets
that exist, and that each evaluated combination is listed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Evaluation", "StudyError", "canonical", "check_study", "check_variant_steps", "evaluations"]


class StudyError(ValueError):
    """A study file that is well-formed but inconsistent; the message names the key."""


@dataclass(frozen=True, order=True)
class Evaluation:
    model: str
    ft: str
    variant: str
    task: str
    dataset: str


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


def _names(config: dict[str, Any], section: str) -> set[str]:
    return set(config.get(section) or {})


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


def check_study(config: dict[str, Any]) -> None:
    """Raise :class:`StudyError` naming the first key that refers to something undefined."""
    datasets = _names(config, "datasets")
    models = _names(config, "models")
    finetunes = _names(config, "finetune") | {"none"}
    variants = _names(config, "variants")
    for slug, model in (config.get("models") or {}).items():
        if model["source"].startswith("tiny:"):
            tok = model.get("tokenizer_dataset")
            if tok is None:
                raise StudyError(f"models.{slug}: a tiny model needs tokenizer_dataset (one of {sorted(datasets)})")
            if tok not in datasets:
                raise StudyError(
                    f"models.{slug}.tokenizer_dataset: {tok!r} is not a dataset; defined: {sorted(datasets)}"
                )
    for slug, ft in (config.get("finetune") or {}).items():
        if slug == "none":
            if ft:
                raise StudyError("finetune.none must be empty: it passes the model through unchanged")
            continue
        if ft.get("dataset") not in datasets:
            raise StudyError(
                f"finetune.{slug}.dataset: {ft.get('dataset')!r} is not a dataset; defined: {sorted(datasets)}"
            )
    for i, run in enumerate(config.get("runs") or []):
        for key, known in (("models", models), ("finetune", finetunes), ("variants", variants)):
            names = run[key] if run[key] != "all" else []
            unknown = [n for n in names if n not in known]
            if unknown:
                raise StudyError(f"runs[{i}].{key}: {unknown} not defined; defined: {sorted(known)}")
        for task, dataset in run["tasks"].items():
            if dataset not in datasets:
                raise StudyError(f"runs[{i}].tasks.{task}: {dataset!r} is not a dataset; defined: {sorted(datasets)}")
    if not evaluations(config):
        raise StudyError("runs: the study evaluates nothing")
    check_variant_steps(config)


def check_variant_steps(config: dict[str, Any]) -> None:
    """Validate every variant step's settings with its method's config (unknown keys, bad values)."""
    from vlmopt.compress import parse_step

    for slug, steps in (config.get("variants") or {}).items():
        for i, step in enumerate(steps):
            try:
                parse_step(step)
            except (ValueError, TypeError) as exc:
                raise StudyError(f"variants.{slug}[{i}]: {exc}") from exc
