"""A study file: validation beyond the JSON Schema, and expansion of runs into evaluations.

The JSON Schema (workflow/schemas/config.schema.yaml) checks keys, types and values; this module
checks what a schema cannot: that every slug a run names is defined, that tasks meet datasets
that exist, and that each evaluated combination is listed once.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ATTENTION",
    "AXES",
    "NUMERIC_AXES",
    "SweepPoint",
    "sweep_points",
    "Evaluation",
    "StudyError",
    "canonical",
    "check_study",
    "check_variant_steps",
    "evaluations",
    "expand_grids",
    "planned_figures",
    "GENERATIVE_TASKS",
    "PRUNING_METHODS",
    "QUANTIZERS",
    "grid_slug",
    "profiled",
    "swept",
]


# Profiling sweeps (vlmopt.profiling.sweep measures them): their axes and points, defined here so
# that planning a study never imports torch.
#: Sweep axes and what each one changes.
AXES: dict[str, str] = {
    "image_size": "longest image side handed to the processor (pixels, aspect kept)",
    "prompt_length": "text tokens of each prompt (filler words before the task's prompt)",
    "batch_size": "samples per timed call",
    "dtype": "floating-point type of the weights and activations",
    "attn_implementation": "attention kernels of the model's parts",
    "compile": "torch.compile of each transformer layer",
}
#: The axes whose values are numbers (drawn as curves; the others as bars).
NUMERIC_AXES = ("image_size", "prompt_length", "batch_size")
DTYPE_NAMES = ("float32", "float16", "bfloat16")
ATTENTION = ("eager", "sdpa", "flash_attention_2")


@dataclass(frozen=True)
class SweepPoint:
    """One value of one sweep axis."""

    axis: str
    value: Any

    def __post_init__(self) -> None:
        if self.axis not in AXES:
            raise ValueError(f"unknown profiling sweep axis {self.axis!r}; known: {sorted(AXES)}")
        allowed: tuple[Any, ...] | None = None
        if self.axis in NUMERIC_AXES:
            if isinstance(self.value, bool) or not isinstance(self.value, int) or self.value < 1:
                raise ValueError(f"profiling.sweep.{self.axis}: {self.value!r} is not a positive integer")
        elif self.axis == "dtype":
            allowed = DTYPE_NAMES
        elif self.axis == "attn_implementation":
            allowed = ATTENTION
        elif self.axis == "compile":
            allowed = (False, True)
        if allowed is not None and (self.value not in allowed or type(self.value) is not type(allowed[0])):
            raise ValueError(f"profiling.sweep.{self.axis}: {self.value!r} is not one of {list(allowed)}")

    @property
    def slug(self) -> str:
        """File-name form: ``batch_size-4``, ``dtype-bfloat16``, ``compile-true``."""
        value = str(self.value).lower() if isinstance(self.value, bool) else str(self.value)
        return f"{self.axis}-{value}"

    @property
    def text(self) -> str:
        """The value as the efficiency table's ``sweep_value`` column holds it."""
        return str(self.value).lower() if isinstance(self.value, bool) else str(self.value)


def sweep_points(sweep: Mapping[str, Any] | None) -> list[SweepPoint]:
    """The points of a ``profiling.sweep`` mapping (axis -> list of values), in axis then value order."""
    points: list[SweepPoint] = []
    for axis, values in (sweep or {}).items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"profiling.sweep.{axis}: expected a non-empty list of values, got {values!r}")
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"profiling.sweep.{axis}: {values} repeats a value")
        points += [SweepPoint(axis, v) for v in values]
    return points


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


def _slug_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "_".join(_slug_value(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).lower()
    return re.sub(r"[^a-z0-9]+", "", text.replace(".", "p"))


def grid_slug(grid: str, point: dict[str, Any]) -> str:
    """The variant slug of one grid point: ``{grid}-{axis}{value}-...`` in axis order.

    Lists join with ``_`` (``position: [first, last]`` -> ``positionfirst_last``); a decimal point
    becomes ``p`` (``ratio: 0.25`` -> ``ratio0p25``); other characters outside ``[a-z0-9]`` drop.
    """
    return "-".join([grid, *(f"{axis.replace('_', '')}{_slug_value(v)}" for axis, v in point.items())])


def _fill(template: Any, point: dict[str, Any]) -> Any:
    """Replace every string ``"{axis}"`` in ``template`` by that axis' value (of any type)."""
    if isinstance(template, str):
        m = re.fullmatch(r"\{(\w+)\}", template)
        if m:
            if m.group(1) not in point:
                raise KeyError(m.group(1))
            return point[m.group(1)]
        return template
    if isinstance(template, dict):
        return {k: _fill(v, point) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, point) for v in template]
    return template


def expand_grids(config: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Variants generated by the study's ``grids``: slug -> steps, in a deterministic order.

    A grid has ``axes`` (name -> list of values; the cartesian product, first axis slowest) and
    ``steps``, a variant whose strings ``"{name}"`` are replaced by the point's value. Optional
    ``skip`` lists partial points (axis -> value) whose matching points are left out, for
    example the points where every part stays unquantized.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    declared = set(config.get("variants") or {})
    for grid, spec in (config.get("grids") or {}).items():
        axes = spec["axes"]
        names = list(axes)
        used = set(re.findall(r"\{(\w+)\}", repr(spec["steps"])))
        unused = [n for n in names if n not in used]
        if unused:
            raise StudyError(f"grids.{grid}.axes: {unused} never appear as '{{name}}' in the grid's steps")
        for name, values in axes.items():
            if len(values) != len({repr(v) for v in values}):
                raise StudyError(f"grids.{grid}.axes.{name}: repeated values {values}")
        skips = spec.get("skip") or []
        for i, partial in enumerate(skips):
            unknown = [k for k in partial if k not in axes]
            if unknown:
                raise StudyError(f"grids.{grid}.skip[{i}]: {unknown} are not axes; axes: {names}")
        for values in itertools.product(*(axes[n] for n in names)):
            point = dict(zip(names, values, strict=True))
            if any(all(point[k] == v for k, v in partial.items()) for partial in skips):
                continue
            slug = grid_slug(grid, point)
            try:
                steps = _fill(spec["steps"], point)
            except KeyError as exc:
                raise StudyError(f"grids.{grid}.steps: '{{{exc.args[0]}}}' is not an axis; axes: {names}") from None
            if slug in declared or slug in out:
                raise StudyError(f"grids.{grid}: variant slug {slug!r} is produced twice or also declared in variants")
            out[slug] = steps
    return out


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


#: Tasks whose predictions are text a reader can compare (the before/after examples).
GENERATIVE_TASKS = ("captioning", "vqa", "real_vs_generated")
#: Weight quantization methods with one bit width (the drop-off figures).
QUANTIZERS = ("uniform", "gptq", "awq")
#: Structural pruning methods (the pruning figure and table).
PRUNING_METHODS = ("prune_layers", "prune_heads")


def planned_figures(config: dict[str, Any]) -> list[str]:
    """The report's figures (rule ``figure``) that the study will have data for, judged from its
    settings (grids expanded), in the report's order: quality against size and cost and the task bars
    always; the drop-off with a single-step weight quantization, its 3-D view with variants of weight
    quantization only, SVD with a single SVD step, pruning with a layer- or head-pruning step, the
    confusion matrices with a real-vs-generated task, the before/after examples with a generative
    task, and the sweep's curves with a profiling sweep."""
    evals = evaluations(config)
    tasks = {e.task for e in evals}
    steps = [config["variants"].get(v) or [] for v in sorted({e.variant for e in evals})]
    methods = [[step.get("method") for step in s] for s in steps]
    weight_only = any(
        s and all(step.get("method") in QUANTIZERS and step.get("activation_bits") is None for step in s) for s in steps
    )
    planned = {
        "quality_vs_size": True,
        "quality_vs_cost": True,
        "quality_vs_bits": any(len(m) == 1 and m[0] in QUANTIZERS for m in methods),
        "dropoff_3d": weight_only,
        "svd": any(m == ["svd"] for m in methods),
        "pruning": any(set(m) & set(PRUNING_METHODS) for m in methods),
        "task_bars": True,
        "confusion": "real_vs_generated" in tasks,
        "examples": bool(tasks & set(GENERATIVE_TASKS)),
        "scaling": bool(swept(config)),
    }
    return [name for name, wanted in planned.items() if wanted]


def profiled(config: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, str]]:
    """What to profile: (model, ft, variant) -> {task: the first dataset, by name, it is evaluated on}.

    One profiling job per variant measures each of its tasks; empty when ``profiling.enabled`` is false.
    """
    if not (config.get("profiling") or {}).get("enabled", True):
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
    if section.get("sweep") and section.get("enabled", True) and not points:
        raise StudyError("profiling.sweep_on selects no profiled (model, finetune, variant): no run evaluates one")


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
    if not evaluations(config):
        raise StudyError("runs: the study evaluates nothing")
    check_variant_steps(config)
    _check_sweep(config, models, finetunes, variants)


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
    """Validate every variant step's settings with its method's config (unknown keys, bad values)."""
    from vlmopt.compress import parse_step, step_datasets

    datasets = _names(config, "datasets")
    for slug, steps in (config.get("variants") or {}).items():
        for i, step in enumerate(steps):
            try:
                method, parsed = parse_step(step)
            except (ValueError, TypeError) as exc:
                raise StudyError(f"variants.{slug}[{i}]: {exc}") from exc
            for dataset, _split in step_datasets(step):
                if dataset not in datasets:
                    key = "calibration.dataset" if method.calibrated else "dataset"
                    raise StudyError(
                        f"variants.{slug}[{i}].{key}: {dataset!r} is not a dataset; "
                        f"a {parsed.method} step reads one of {sorted(datasets)}"
                    )
