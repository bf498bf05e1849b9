# Python helpers only: config validation, wildcard constraints, input and params functions.
import re
from pathlib import Path

import yaml
from snakemake.utils import validate

from vlmopt.code_digest import stage_digest
from vlmopt.data import SPLITS
from vlmopt.data.schema import require_rows
from vlmopt.data.labeling import CAPTIONER_DEFAULTS, LABELED_SOURCE
from vlmopt.study import (
    FIGURES,
    canonical,
    check_study,
    check_study_file,
    evaluations,
    expand_grids,
    exported,
    figure_file,
    planned_figures,
    profiled,
    shard_count,
    swept,
)
from vlmopt.tasks import TASKS, get_task

# A study file given with --configfile names itself: an empty one would leave the default study
# in place and run it.
for _study_file in workflow.overwrite_configfiles or []:
    check_study_file(_study_file)
# Defaults live in the code that uses each setting; the schema only checks (and documents them).
validate(config, "../workflow/schemas/config.schema.yaml", set_default=False)
config["variants"] = {**config["variants"], **expand_grids(config)}
# The main Snakemake process checks the whole study. A process started to run one job (on a
# cluster node: exec mode "remote") reads the same, already checked study and skips the check,
# whose model and compression imports (torch, transformers) take seconds of every job's start-up.
if workflow.is_main_process:
    check_study(config)
# Sorted keys everywhere: reordering a study file's keys must not change any job's params.
_sorted_config = canonical(config)
config.clear()
config.update(_sorted_config)

EVALUATIONS = evaluations(config)
# (model, ft, variant) -> {task: dataset}: one profiling job per variant, each task on its first dataset.
PROFILED = profiled(config)
# (model, ft, variant) of each quantized variant whose packed folder is exported (`export: true`).
EXPORTED = exported(config)
# (model, ft, variant, point) -> {axis, value}: one job per sweep point (vlmopt.profiling.sweep).
SWEPT = swept(config)
# Files of the report's figures that the study has data for, one figure job each (svd.png ...).
FIGURE_FILES = [figure_file(name) for name in planned_figures(config)]
# The study's profiling settings (what every profile measures with); DEFAULTS of
# vlmopt.profiling.variant fill in the rest. The sweep's own keys reach only the sweep jobs.
_SWEEP_KEYS = ("enabled", "sweep", "sweep_on", "compile_backend")
PROFILING = canonical(
    {k: v for k, v in config.get("profiling", {}).items() if k not in _SWEEP_KEYS}
)
# Digest of the library code each rule runs, computed on first use and kept.
_CODE = {}


def code(stage):
    """A rule's `code` param: the digest of the library code its stage runs (vlmopt.code_digest)."""

    def digest(wildcards):
        if stage not in _CODE:
            _CODE[stage] = stage_digest(stage)
        return _CODE[stage]

    return digest


# The defaults of the inference and profiling sections are those of vlmopt.infer and
# vlmopt.profiling.variant, which import torch (seconds of every job's start-up): they are read
# from the schema instead, whose defaults tests/workflow/test_schema.py holds equal to the library's.
_SCHEMA = yaml.safe_load(
    (Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml").read_text()
)


def schema_defaults(section):
    """{setting: default} of one top-level section of the study, as the schema gives them."""
    settings = _SCHEMA["properties"][section]["properties"]
    return {k: s["default"] for k, s in settings.items() if "default" in s}


INFERENCE = canonical(schema_defaults("inference") | config.get("inference", {}))
# Rows per inference job (the number of jobs follows each split's length), else a fixed number of jobs.
SHARD_SIZE = INFERENCE.get("shard_size")
if SHARD_SIZE:
    INFERENCE.pop("shards")


# What every inference job reads; per-task generation overrides reach that task's jobs only
# (generation_settings), and the retrieval depth retrieval jobs only (task_settings). The number
# of processes per job changes no prediction: it is left out, so changing it reruns nothing.
GENERATION = {
    k: v
    for k, v in INFERENCE.items()
    if k not in ("retrieval_k", "generation", "processes")
}


def _alternatives(names):
    # No names: a pattern that matches nothing.
    return "|".join(re.escape(n) for n in sorted(names)) or "(?!)"


# Datasets labeled from another dataset (label_dataset) and those prepared from a source.
LABELED = sorted(
    d for d, s in config["datasets"].items() if s.get("source") == LABELED_SOURCE
)
PREPARED = sorted(set(config["datasets"]) - set(LABELED))

# The study's seed; 0 where it leaves it out, as the library's stage functions default to
# (tests/workflow/test_schema.py holds the two equal).
SEED = config.get("seed", 0)


wildcard_constraints:
    dataset=_alternatives(config["datasets"]),
    model=_alternatives(config["models"]),
    ft=_alternatives(set(config.get("finetune", {})) | {"none"}),
    trained=_alternatives(set(config.get("finetune", {})) - {"none"}),
    variant="[a-z0-9_-]+",
    point="[a-z0-9_-]+",
    task="|".join(TASKS),
    split="|".join(SPLITS),
    shard=r"\d+-of-\d+",


def dataset_settings(wildcards):
    # Prompt templates are read at inference only: changing them must not rebuild the dataset.
    return {
        k: v
        for k, v in config["datasets"][wildcards.dataset].items()
        if k != "templates"
    }


def label_inputs(wildcards):
    """The labeled dataset's source tables and images, and the captioner's model folder if any."""
    spec = config["datasets"][wildcards.dataset]
    source = spec["dataset"]
    inputs = {
        "tables": expand(f"resources/data/{source}/{{split}}.parquet", split=SPLITS),
        "images": f"resources/data/{source}/images",
    }
    captioner = spec.get("captioner")
    if captioner:
        ft = captioner.get("finetune", CAPTIONER_DEFAULTS["finetune"])
        inputs["captioner"] = (
            f"resources/models/{captioner['model']}"
            if ft == "none"
            else f"results/finetuned/{captioner['model']}/{ft}"
        )
    return inputs


def model_settings(wildcards):
    return config["models"][wildcards.model]


def tokenizer_table(wildcards):
    """Train split of the dataset whose text trains a tiny model's tokenizer (nothing otherwise)."""
    dataset = config["models"][wildcards.model].get("tokenizer_dataset")
    if config["models"][wildcards.model]["source"].startswith("tiny:") and dataset:
        return f"resources/data/{dataset}/train.parquet"
    return []


def finetune_settings(wildcards):
    return config["finetune"][wildcards.trained]


def finetune_inputs(wildcards):
    dataset = config["finetune"][wildcards.trained]["dataset"]
    return {
        "model": f"resources/models/{wildcards.model}",
        "train": f"resources/data/{dataset}/train.parquet",
        "images": f"resources/data/{dataset}/images",
    }


def finetuned_model(wildcards):
    """The model a variant starts from: the built model for ft=none, the finetuned one otherwise."""
    if wildcards.ft == "none":
        return f"resources/models/{wildcards.model}"
    return f"results/finetuned/{wildcards.model}/{wildcards.ft}"


def variant_steps(wildcards):
    return config["variants"][wildcards.variant]


def calibration_inputs(wildcards):
    """Split tables and images of the datasets that the variant's steps calibrate or train on."""
    # Imported here: only compression jobs (and the main process) pay for torch.
    from vlmopt.compress import step_datasets

    inputs = {}
    for i, step in enumerate(config["variants"][wildcards.variant]):
        for dataset, split in step_datasets(step):
            inputs[f"calibration_{i}"] = f"resources/data/{dataset}/{split}.parquet"
            inputs[f"calibration_images_{i}"] = f"resources/data/{dataset}/images"
    return inputs


def shard_files(wildcards):
    """The shard files of one evaluation: `inference.shards` of them, or one per `shard_size` rows.

    With `shard_size`, the count is read from the prepared split table (its Parquet footer): the
    dataset's job is a checkpoint, so Snakemake plans these jobs once the table exists, and an
    empty split is an error then, naming the evaluation, the split and the splits with rows.
    """
    n = INFERENCE.get("shards", 1)
    if SHARD_SIZE:
        job = (
            checkpoints.label_dataset
            if wildcards.dataset in LABELED
            else checkpoints.prepare_dataset
        )
        tables = job.get(dataset=wildcards.dataset).output.tables
        table = next(
            t for t in tables if Path(t).name == f"{INFERENCE['split']}.parquet"
        )
        # An empty split stops planning here, before any model is loaded for it.
        evaluation = "/".join(
            wildcards[k] for k in ("model", "ft", "variant", "task", "dataset")
        )
        n = shard_count(
            require_rows(table, f"inference (inference.split) of {evaluation}"),
            SHARD_SIZE,
        )
    return [
        f"results/predictions/{wildcards.model}/{wildcards.ft}/{wildcards.variant}/"
        f"{wildcards.task}/{wildcards.dataset}/shard-{i}-of-{n}.parquet"
        for i in range(1, n + 1)
    ]


def split_inputs(wildcards):
    return {
        "table": f"resources/data/{wildcards.dataset}/{INFERENCE['split']}.parquet",
        "images": f"resources/data/{wildcards.dataset}/images",
    }


def chain_settings(wildcards):
    """Everything that determines one evaluation's scores (hashed into the score rows)."""
    return {
        "model": config["models"][wildcards.model],
        "finetune": config.get("finetune", {}).get(wildcards.ft, {}),
        "variant": config["variants"][wildcards.variant],
        "dataset": dataset_settings(wildcards),
        "inference": generation_settings(wildcards),
        "task": task_settings(wildcards),
    }


def score_keys(wildcards):
    return {
        k: getattr(wildcards, k) for k in ("model", "ft", "variant", "task", "dataset")
    }


def all_scores(wildcards):
    return [
        f"results/scores/{e.model}/{e.ft}/{e.variant}/{e.task}/{e.dataset}/scores.parquet"
        for e in EVALUATIONS
    ]


def all_profiles(wildcards):
    return [f"results/profile/{m}/{ft}/{v}.parquet" for (m, ft, v) in sorted(PROFILED)]


def all_sweeps(wildcards):
    return [
        f"results/sweep/{m}/{ft}/{v}/{point}.parquet"
        for (m, ft, v, point) in sorted(SWEPT)
    ]


def sweep_point(wildcards):
    """{axis, value} of a sweep job."""
    key = (wildcards.model, wildcards.ft, wildcards.variant, wildcards.point)
    if key not in SWEPT:
        raise ValueError(
            f"no sweep point {'/'.join(key)}: profiling.sweep and sweep_on define no such job"
        )
    return SWEPT[key]


def sweep_settings(wildcards):
    """The profiling settings of a sweep job: the profile's, and the compile backend for compile points."""
    if sweep_point(wildcards)["axis"] != "compile":
        return PROFILING
    backend = config.get("profiling", {}).get(
        "compile_backend", schema_defaults("profiling")["compile_backend"]
    )
    return canonical(PROFILING | {"compile_backend": backend})


def _profiled_tasks(wildcards):
    key = (wildcards.model, wildcards.ft, wildcards.variant)
    if key not in PROFILED:
        raise ValueError(
            f"nothing profiles {'/'.join(key)}: the study evaluates no such (model, finetune, variant)"
        )
    return PROFILED[key]


def profile_inputs(wildcards):
    """The model folder, and the split table and images of each task's profiled dataset."""
    inputs = {
        "model": f"results/models/{wildcards.model}/{wildcards.ft}/{wildcards.variant}"
    }
    for task, dataset in sorted(_profiled_tasks(wildcards).items()):
        inputs[f"table_{task}"] = (
            f"resources/data/{dataset}/{INFERENCE['split']}.parquet"
        )
        inputs[f"images_{task}"] = f"resources/data/{dataset}/images"
    return inputs


def profile_tasks(wildcards):
    """{task: {dataset, generation}}: what the profile measures and with which generation settings."""
    out = {}
    for task, dataset in sorted(_profiled_tasks(wildcards).items()):
        settings = task_generation(task)
        out[task] = {
            "dataset": dataset,
            "generation": {
                k: v
                for k, v in settings.items()
                if k
                in (
                    "max_new_tokens",
                    "num_beams",
                    "length_penalty",
                    "repetition_penalty",
                )
            },
        }
    return out


def profile_chain(wildcards):
    """What determines a profile's rows beside the profiling settings: model, finetune, variant, datasets."""
    return {
        "model": config["models"][wildcards.model],
        "finetune": config.get("finetune", {}).get(wildcards.ft, {}),
        "variant": config["variants"][wildcards.variant],
        "datasets": {
            d: {k: v for k, v in config["datasets"][d].items() if k != "templates"}
            for d in sorted(set(_profiled_tasks(wildcards).values()))
        },
    }


def all_variant_models(wildcards):
    return sorted({f"results/models/{e.model}/{e.ft}/{e.variant}" for e in EVALUATIONS})


def task_settings(wildcards):
    """Settings of a similarity task: re-ranking depth (retrieval), prompt templates (classification)."""
    return get_task(wildcards.task).inference_settings(
        config["datasets"][wildcards.dataset], INFERENCE
    )


def generation_settings(wildcards):
    """Inference settings of one task: the study's defaults with that task's generation overrides."""
    return task_generation(wildcards.task)


def task_generation(task):
    return canonical(GENERATION | INFERENCE.get("generation", {}).get(task, {}))


def figure_name(wildcards):
    """The figure of a `figure` job: its file name without the extension."""
    return wildcards.figure.rsplit(".", 1)[0]


def figure_caption(wildcards):
    """What the figure shows and how to read it (vlmopt.study.FIGURES), for `snakemake --report`."""
    return FIGURES[figure_name(wildcards)].caption


def figure_category(wildcards):
    return FIGURES[figure_name(wildcards)].category
