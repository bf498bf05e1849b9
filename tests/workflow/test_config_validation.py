"""A wrong study file stops the run before any job, with a message naming the key."""

from __future__ import annotations

import pytest
import yaml

from .conftest import run_snakemake


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
