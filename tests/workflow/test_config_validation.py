"""A wrong study file stops the run before any job, with a message naming the key."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import yaml

from .conftest import NO_CLUSTER_CONF, REPO, SNAKEMAKE, run_snakemake


def _edit(workdir, change):
    path = workdir / "study.yaml"
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda c: c["inference"].update(beams=3), "beams"),
        (lambda c: c["datasets"]["shapes"].update(n_train="many"), "many"),
        (lambda c: c["inference"].update(split="dev"), "dev"),
        (lambda c: c["models"].update({"Bad.Slug": {"source": "tiny:blip"}}), "Bad.Slug"),
        (lambda c: c["runs"][0].update(models=["blip-huge"]), "runs[0].models: ['blip-huge'] not defined"),
        (lambda c: c["finetune"]["full"].update(dataset="coco"), "finetune.full.dataset: 'coco' is not a dataset"),
        (lambda c: c["variants"].update(odd=[{"method": "magic"}]), "magic"),
    ],
)
def test_bad_config_names_the_key(workdir, change, expected):
    configfile = _edit(workdir, change)
    result = run_snakemake(workdir, "--dry-run", configfile=configfile)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr
    assert not (workdir / "resources").exists()


def test_calibrated_variant_takes_its_split_as_input(workdir):
    step = {"method": "gptq", "bits": 4, "part": "language", "calibration": {"dataset": "shapes", "split": "val"}}
    configfile = _edit(workdir, lambda c: c["variants"].update({"gptq-w4": [step]}))
    result = run_snakemake(workdir, "--dry-run", configfile=configfile)
    assert result.returncode == 0, result.stderr
    # Each compress job's own lines end where the next job's timestamp line starts.
    jobs = [b.split("\n[")[0] for b in result.stdout.split("rule compress:")[1:]]
    blocks = [b for b in jobs if "variant=gptq-w4" in b]
    assert blocks and all("resources/data/shapes/val.parquet" in b.split("output:")[0] for b in blocks)


def test_calibration_on_an_undefined_dataset_names_the_key(workdir):
    step = {"method": "awq", "bits": 4, "part": "language", "calibration": {"dataset": "coco"}}
    configfile = _edit(workdir, lambda c: c["variants"].update({"awq-w4": [step]}))
    result = run_snakemake(workdir, "--dry-run", configfile=configfile)
    assert result.returncode != 0
    assert "variants.awq-w4[0].calibration.dataset: 'coco' is not a dataset" in result.stdout + result.stderr


def test_variants_that_cannot_run_fail_the_dry_run_naming_each(workdir):
    """Step order, parts the family lacks and layer counts are checked before any job (point: no
    GPU-hours of finetuning before a variant's mistake shows)."""
    misordered = {
        "int8-then-w4": [
            {"method": "dynamic_int8", "part": "language"},
            {"method": "uniform", "bits": 4, "part": "language"},
        ],
        "w4-then-lora": [
            {"method": "uniform", "bits": 4, "part": "language"},
            {"method": "lora", "r": 4, "alpha": 8, "dataset": "shapes", "targets": ["query"]},
        ],
    }
    configfile = _edit(workdir, lambda c: c["variants"].update(misordered))
    result = run_snakemake(workdir, "--dry-run", configfile=configfile)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "variants.int8-then-w4: step 1: uniform comes after the runtime step dynamic_int8" in output
    assert "variants.w4-then-lora: step 1: a merged lora step after uniform" in output

    unfit = {
        "drop-all": [{"method": "prune_layers", "part": "language", "drop_last": 3}],
        "bridge-w4": [{"method": "uniform", "bits": 4, "part": "bridge"}],
    }
    configfile = _edit(workdir, lambda c: c["variants"].update({**unfit, **{k: [] for k in misordered}}))
    result = run_snakemake(workdir, "--dry-run", configfile=configfile)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "variants.drop-all on model 'blip-tiny' (blip): step 0: prune_layers: drop_last=3 would drop all 3" in output
    # BLIP and CLIP have no bridge; BLIP-2's Q-Former is one.
    assert (
        "variants.bridge-w4 on model 'blip-tiny' (blip): step 0: uniform: no Linear module matches part='bridge'"
        in output
    )
    assert "variants.bridge-w4 on model 'clip-tiny' (clip)" in output
    assert "variants.bridge-w4 on model 'blip2-tiny'" not in output
    assert "Job stats" not in output  # no DAG was built


def test_a_study_file_without_a_name_is_refused(workdir):
    empty = workdir / "empty.yaml"
    empty.write_text("{}\n")
    result = run_snakemake(workdir, "--dry-run", configfile=empty)
    assert result.returncode != 0
    assert f"study file {empty} is empty" in result.stdout + result.stderr


def test_the_readme_recovery_commands_run_without_a_core_count(workdir):
    """`snakemake --unlock` and `--list-changes params` as the README writes them: no --cores."""
    for command in (["--unlock"], ["--list-changes", "params"]):
        result = subprocess.run(
            [
                SNAKEMAKE,
                "-s",
                str(REPO / "Snakefile"),
                "--directory",
                str(workdir),
                "--configfile",
                str(workdir / "study.yaml"),
                *command,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=workdir,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "SLURM_CONF": str(NO_CLUSTER_CONF)},
        )
        assert result.returncode == 0, (command, result.stderr[-2000:])
        if command == ["--unlock"]:
            assert "Unlocked working directory" in result.stdout + result.stderr


def _prepared_vqa_study(workdir, test_rows: int):
    """A study of tiny BLIP on a prepared VQA-shaped dataset of ``test_rows`` test questions (no
    images needed to plan), at 5,000 rows per inference job; the study file's path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = max(test_rows, 8)
    folder = workdir / "resources" / "data" / "vqa"
    (folder / "images").mkdir(parents=True)
    ids = pa.array([f"q{i}" for i in range(rows)])
    table = pa.table(
        {
            "sample_id": ids,
            "image": pa.array([f"images/{i % 40_504}.jpg" for i in range(rows)]),
            "question": pa.array(["what color is it?"] * rows),
            "answers": pa.array([["red"] * 10] * rows, type=pa.list_(pa.string())),
            "answer_type": pa.array(["other"] * rows),
        }
    )
    for split in ("train", "val"):
        pq.write_table(table.slice(0, 8), folder / f"{split}.parquet")
    pq.write_table(table.slice(0, test_rows), folder / "test.parquet")

    def study(c):
        c["datasets"] = {"vqa": {"source": "synthetic", "n_train": 8, "n_val": 8, "n_test": max(test_rows, 1)}}
        c["models"] = {"blip-tiny": {"source": "tiny:blip", "tokenizer_dataset": "vqa"}}
        c["finetune"] = {"none": {}}
        c["runs"] = [{"models": ["blip-tiny"], "finetune": ["none"], "variants": "all", "tasks": {"vqa": "vqa"}}]
        c["inference"].pop("shards")
        c["inference"]["shard_size"] = 5000

    return _edit(workdir, study)


def test_shard_size_plans_jobs_from_the_prepared_split(workdir):
    """A VQAv2-sized split (214,354 questions) at 5,000 rows per job: 43 inference jobs per variant."""
    configfile = _prepared_vqa_study(workdir, 214_354)
    result = run_snakemake(workdir, "--dry-run", configfile=configfile)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = dict(
        line.split()[:2] for line in result.stdout.splitlines() if line.split()[:1] in (["infer"], ["prepare_dataset"])
    )
    assert "prepare_dataset" not in jobs  # the split is prepared: the jobs follow from its length
    assert int(jobs["infer"]) == 43 * 2  # two variants
    assert "shard-43-of-43.parquet" in result.stdout and "shard-44-of-43" not in result.stdout


def test_an_empty_prepared_split_stops_planning_naming_the_evaluation_and_the_splits_with_rows(workdir):
    configfile = _prepared_vqa_study(workdir, 0)
    result = run_snakemake(workdir, "--dry-run", configfile=configfile)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "dataset 'vqa' has no rows in split 'test', which inference (inference.split) of blip-tiny/none/" in output
    assert "its splits with rows: train (8 rows), val (8 rows)" in output
    assert "rule infer" not in output


def test_shards_and_shard_size_together_are_refused(workdir):
    configfile = _edit(workdir, lambda c: c["inference"].update(shard_size=100))
    result = run_snakemake(workdir, "--dry-run", configfile=configfile)
    assert result.returncode != 0
    assert (
        "give shards (a fixed number of jobs) or shard_size (rows per job), not both" in result.stdout + result.stderr
    )


def test_export_plans_one_job_per_evaluated_quantized_variant(workdir):
    result = run_snakemake(workdir, "--dry-run", configfile=_edit(workdir, lambda c: c.update(export=True)))
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = dict(line.split()[:2] for line in result.stdout.splitlines() if line.split()[:1] == ["export"])
    assert int(jobs["export"]) == 4  # w8-language of blip and blip2 (finetuned), clip and blip-itm
    outputs = set(re.findall(r"results/exported/[^\s,;]+", result.stdout))
    assert outputs == {
        f"results/exported/{m}/{ft}/w8-language"
        for m, ft in (("blip-tiny", "full"), ("blip2-tiny", "full"), ("clip-tiny", "none"), ("blip-itm-tiny", "none"))
    }
    plain = run_snakemake(workdir, "--dry-run", configfile=_edit(workdir, lambda c: c.pop("export")))
    assert plain.returncode == 0 and "results/exported/" not in plain.stdout
