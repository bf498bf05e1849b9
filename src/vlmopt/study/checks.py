"""Checks of a study file beyond its JSON Schema: every name a key refers to is defined, tasks meet
datasets that exist and models that can run them, and every variant step's settings are valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmopt.model_source import check_source
from vlmopt.study.runs import PROFILING_ENABLED, StudyError, evaluations, swept

__all__ = ["check_study", "check_study_file", "check_variant_steps", "check_variant_structure"]


def _names(config: dict[str, Any], section: str) -> set[str]:
    return set(config.get(section) or {})


def _check_sweep(config: dict[str, Any], models: set[str], finetunes: set[str], variants: set[str]) -> None:
    section = config.get("profiling") or {}
    for key, known in (("models", models), ("finetune", finetunes), ("variants", variants)):
        names = (section.get("sweep_on") or {}).get(key)
        if names in (None, "all"):
            continue
        unknown = sorted(set(names) - known)
        if unknown:
            raise StudyError(f"profiling.sweep_on.{key}: {unknown} not defined; defined: {sorted(known)}")
    points = swept(config)  # validates the axes and values too
    if section.get("sweep") and section.get("enabled", PROFILING_ENABLED) and not points:
        raise StudyError("profiling.sweep_on selects no profiled (model, finetune, variant): no run evaluates one")


def check_study(config: dict[str, Any]) -> None:
    """Raise :class:`StudyError` naming the first key that refers to something undefined."""
    datasets = _names(config, "datasets")
    models = _names(config, "models")
    finetunes = _names(config, "finetune") | {"none"}
    variants = _names(config, "variants")
    for slug, model in (config.get("models") or {}).items():
        try:
            check_source(model["source"])
        except FileNotFoundError as err:
            raise StudyError(f"models.{slug}.source: {err}") from None
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
    _check_labeled_datasets(config, datasets, models, finetunes)
    for i, run in enumerate(config.get("runs") or []):
        for key, known in (("models", models), ("finetune", finetunes), ("variants", variants)):
            names = run[key] if run[key] != "all" else []
            unknown = [n for n in names if n not in known]
            if unknown:
                raise StudyError(f"runs[{i}].{key}: {unknown} not defined; defined: {sorted(known)}")
        for task, dataset in run["tasks"].items():
            if dataset not in datasets:
                raise StudyError(f"runs[{i}].tasks.{task}: {dataset!r} is not a dataset; defined: {sorted(datasets)}")
        _check_family_tasks(config, i, run)
    _check_task_names(config)
    inference = config.get("inference") or {}
    if "shards" in inference and "shard_size" in inference:
        raise StudyError(
            "inference: give shards (a fixed number of jobs) or shard_size (rows per job), not both; "
            f"got shards={inference['shards']} and shard_size={inference['shard_size']}"
        )
    if not evaluations(config):
        raise StudyError("runs: the study evaluates nothing")
    check_variant_steps(config)
    check_variant_structure(config)
    _check_sweep(config, models, finetunes, variants)


def _check_task_names(config: dict[str, Any]) -> None:
    """Every task a study names is one of the registry's (the schema lists none, so that adding a
    task is a change to vlmopt.tasks only); generation settings are for generative tasks."""
    from vlmopt.tasks import GENERATIVE_TASKS, TASKS

    named = [
        (f"runs[{i}].tasks.{task}", task) for i, run in enumerate(config.get("runs") or []) for task in run["tasks"]
    ]
    for slug, ft in (config.get("finetune") or {}).items():
        named += [(f"finetune.{slug}.tasks", task) for task in (ft or {}).get("tasks") or []]
    for key, task in named:
        if task not in TASKS:
            raise StudyError(f"{key}: unknown task {task!r}; tasks: {', '.join(TASKS)}")
    for task in (config.get("inference") or {}).get("generation") or {}:
        if task not in GENERATIVE_TASKS:
            raise StudyError(
                f"inference.generation.{task}: not a task that generates text; generative tasks: "
                f"{', '.join(GENERATIVE_TASKS)}"
            )


def _check_labeled_datasets(config: dict[str, Any], datasets: set[str], models: set[str], finetunes: set[str]) -> None:
    """A labeled dataset names an existing source dataset and captioner, and nothing it needs needs it."""
    for slug, spec in (config.get("datasets") or {}).items():
        labeled = spec.get("source") == "labeled"
        extra = [k for k in ("dataset", "captioner") if k in spec]
        if not labeled:
            if extra:
                raise StudyError(f"datasets.{slug}: {extra} apply to `source: labeled` only")
            continue
        source = spec.get("dataset")
        if source not in datasets or source == slug:
            raise StudyError(
                f"datasets.{slug}.dataset: {source!r} must name another dataset to label; "
                f"defined: {sorted(datasets - {slug})}"
            )
        captioner = spec.get("captioner")
        if not captioner:
            continue
        model, ft = captioner["model"], captioner.get("finetune", "none")
        if model not in models:
            raise StudyError(f"datasets.{slug}.captioner.model: {model!r} is not a model; defined: {sorted(models)}")
        if ft not in finetunes:
            raise StudyError(f"datasets.{slug}.captioner.finetune: {ft!r} is not defined; defined: {sorted(finetunes)}")
        needs = {config["models"][model].get("tokenizer_dataset")}
        if ft != "none":
            needs.add(config["finetune"][ft].get("dataset"))
        if slug in needs:
            raise StudyError(
                f"datasets.{slug}.captioner: model {model!r} with finetune {ft!r} is built or trained on {slug!r} "
                f"itself, so it cannot label it"
            )


def _check_family_tasks(config: dict[str, Any], i: int, run: dict[str, Any]) -> None:
    """A tiny model's family is known before anything runs: refuse tasks it cannot do."""
    if not any(config["models"][m]["source"].startswith("tiny:") for m in run["models"]):
        return  # Hub checkpoints reveal their family only when loaded; skip the costly import.
    from vlmopt.models import FAMILIES

    for model in run["models"]:
        source = config["models"][model]["source"]
        family = FAMILIES.get(source.removeprefix("tiny:")) if source.startswith("tiny:") else None
        if source.startswith("tiny:") and family is None:
            raise StudyError(f"models.{model}.source: unknown family in {source!r}; known: {sorted(FAMILIES)}")
        for task in run["tasks"]:
            if family is not None and task not in family.tasks:
                raise StudyError(
                    f"runs[{i}].tasks.{task}: model {model!r} ({family.name}) cannot run it; "
                    f"it runs {list(family.tasks)}"
                )


def check_variant_steps(config: dict[str, Any]) -> None:
    """Validate every variant step's settings with its method's config (unknown keys, bad values),
    and each variant's step order (:func:`vlmopt.compress.variant.check_step_order`)."""
    from vlmopt.compress import parse_step, step_datasets, step_tasks
    from vlmopt.compress.variant import check_step_order
    from vlmopt.tasks import TASKS

    datasets = _names(config, "datasets")
    misordered = []
    for slug, steps in (config.get("variants") or {}).items():
        steps_parsed = []
        for i, step in enumerate(steps):
            try:
                method, parsed = parse_step(step)
            except (ValueError, TypeError) as exc:
                raise StudyError(f"variants.{slug}[{i}]: {exc}") from exc
            steps_parsed.append((method, parsed))
            for task in step_tasks(step):
                if task not in TASKS:
                    raise StudyError(
                        f"variants.{slug}[{i}].training.tasks: unknown task {task!r}; tasks: {', '.join(TASKS)}"
                    )
            for dataset, _split in step_datasets(step):
                if dataset not in datasets:
                    key = "calibration.dataset" if method.calibrated else "dataset"
                    raise StudyError(
                        f"variants.{slug}[{i}].{key}: {dataset!r} is not a dataset; "
                        f"a {parsed.method} step reads one of {sorted(datasets)}"
                    )
        try:
            check_step_order(steps_parsed)
        except ValueError as err:
            misordered.append(f"variants.{slug}: {err}")
    if misordered:
        raise StudyError(f"{len(misordered)} variant(s) order their steps wrongly:\n  " + "\n  ".join(misordered))


def check_variant_structure(config: dict[str, Any]) -> None:
    """Check every evaluated (model, variant) pair against the model's structure, without weights.

    Each model whose structure is known on this machine (tiny models, local folders, hub models
    whose configuration is cached: :func:`vlmopt.models.skeleton.model_skeleton`) is built on the
    meta device once, and each variant it is evaluated with is planned on it
    (:func:`vlmopt.compress.plan.plan_variant`): a part the family lacks, a selection that matches
    nothing, ``prune_layers`` dropping every layer. Every problem is listed in one StudyError.
    """
    from vlmopt.compress.plan import plan_variant
    from vlmopt.models.skeleton import model_skeleton

    pairs = sorted({(e.model, e.variant) for e in evaluations(config)})
    skeletons: dict[str, Any] = {}
    problems = []
    for model, variant in pairs:
        steps = config["variants"][variant]
        if not steps:
            continue
        if model not in skeletons:
            spec = config["models"][model]
            options = {k: spec[k] for k in ("image_size", "trust_remote_code") if k in spec}
            try:
                skeletons[model] = model_skeleton(spec["source"], **options)
            except (OSError, ValueError) as err:
                raise StudyError(f"models.{model}.source: {err}") from None
        if skeletons[model] is None:
            continue
        family, skeleton = skeletons[model]
        try:
            plan_variant(skeleton, family.parts(skeleton), steps)
        except ValueError as err:
            problems.append(f"variants.{variant} on model {model!r} ({family.name}): {err}")
    if problems:
        raise StudyError(
            f"{len(problems)} variant(s) cannot be applied to the models they are evaluated with:\n  "
            + "\n  ".join(problems)
        )


def check_study_file(path: str | Path) -> None:
    """A study file given on the command line is a mapping that names its study (``study:``).

    An empty file (or ``{}``) would otherwise leave the default study in place, and a file that
    names no study cannot be told apart from a fragment meant to be merged into another.
    """
    import yaml

    try:
        content = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise StudyError(f"study file {path}: cannot be read ({err})") from None
    if not content:
        raise StudyError(f"study file {path} is empty; a study file names itself (study: <name>) and its sections")
    if not isinstance(content, dict):
        raise StudyError(f"study file {path} must be a mapping of sections, got {type(content).__name__}")
    if not content.get("study"):
        raise StudyError(
            f"study file {path} names no study: add `study: <name>` (it has {', '.join(map(str, content))})"
        )
