# Python helpers only: config validation, wildcard constraints, input and params functions.
import re

from snakemake.utils import validate

from vlmopt.compress import step_datasets
from vlmopt.study import canonical, check_study, evaluations, expand_grids

# Defaults live in the code that uses each setting; the schema only checks.
validate(config, "../workflow/schemas/config.schema.yaml", set_default=False)
config["variants"] = {**config["variants"], **expand_grids(config)}
check_study(config)
# Sorted keys everywhere: reordering a study file's keys must not change any job's params.
_sorted_config = canonical(config)
config.clear()
config.update(_sorted_config)

EVALUATIONS = evaluations(config)
SPLITS = ["train", "val", "test"]
SHARDS = config.get("inference", {}).get("shards", 2)
INFERENCE = canonical(
    {
        "split": "test",
        "batch_size": 16,
        "shards": 2,
        "max_new_tokens": 20,
        "num_beams": 1,
        "max_error_fraction": 0.05,
    }
    | config.get("inference", {})
)


scattergather:
    infer=SHARDS,


def _alternatives(names):
    return "|".join(re.escape(n) for n in sorted(names))


wildcard_constraints:
    dataset=_alternatives(config["datasets"]),
    model=_alternatives(config["models"]),
    ft=_alternatives(set(config.get("finetune", {})) | {"none"}),
    trained=_alternatives(set(config.get("finetune", {})) - {"none"}),
    variant="[a-z0-9_-]+",
    task="captioning|vqa",
    split="train|val|test",


def dataset_settings(wildcards):
    return config["datasets"][wildcards.dataset]


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
    inputs = {}
    for i, step in enumerate(config["variants"][wildcards.variant]):
        for dataset, split in step_datasets(step):
            inputs[f"calibration_{i}"] = f"resources/data/{dataset}/{split}.parquet"
            inputs[f"calibration_images_{i}"] = f"resources/data/{dataset}/images"
    return inputs


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
        "dataset": config["datasets"][wildcards.dataset],
        "inference": INFERENCE,
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


def all_variant_models(wildcards):
    return sorted({f"results/models/{e.model}/{e.ft}/{e.variant}" for e in EVALUATIONS})
