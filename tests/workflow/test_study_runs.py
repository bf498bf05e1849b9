"""The miniature study runs end to end, reruns nothing, and reruns only what a change invalidates."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import yaml

from .conftest import run_snakemake

pytestmark = pytest.mark.slow


def _job_counts(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    counts = {}
    block = dry_run_output.split("Job stats:", 1)[1]
    for line in block.splitlines()[3:]:
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not m:
            break
        counts[m.group(1)] = int(m.group(2))
    counts.pop("total", None)
    return counts


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    import shutil

    from .conftest import REPO

    workdir = tmp_path_factory.mktemp("study")
    shutil.copy(REPO / "tests" / "workflow" / "config.yaml", workdir / "study.yaml")
    result = run_snakemake(workdir, configfile=workdir / "study.yaml")
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def test_tables_and_plots_are_complete(finished_study):
    scores = pd.read_parquet(finished_study / "results/tables/scores.parquet")
    summary = pd.read_parquet(finished_study / "results/tables/summary.parquet")
    # 2 generative models x (none/baseline + full/{baseline, w8-language}) x 2 tasks,
    # 2 contrastive models x none/{baseline, w8-language} x (retrieval, classification by colour),
    # and tiny BLIP finetuned on real-vs-generated label texts.
    assert len(summary) == 12 + 8 + 1
    assert set(summary["task"]) == {"captioning", "vqa", "retrieval", "classification", "real_vs_generated"}
    assert {
        "CIDEr",
        "METEOR",
        "Bleu_4",
        "vqa_accuracy",
        "exact_match",
        "wer",
        "r_mean",
        "txt_r1",
        "img_r10",
        "top1",
        "accuracy",
        "f1",
        "cm_generated_as_real",
    } <= set(summary.columns)
    assert set(summary.loc[summary["task"] == "retrieval", "model"]) == {"clip-tiny", "blip-itm-tiny"}
    assert summary["size_bytes"].gt(0).all()
    assert scores["git_sha"].notna().all() and scores["config_hash"].str.len().eq(16).all()
    assert (scores["n_samples"] == 12).all()
    for png in ("quality_vs_size.png", "task_bars.png"):
        assert (finished_study / "results/plots" / png).stat().st_size > 10_000


def test_rerun_does_nothing(finished_study):
    result = run_snakemake(finished_study, "--dry-run", configfile=finished_study / "study.yaml")
    assert result.returncode == 0, result.stderr
    assert "Nothing to be done" in result.stdout + result.stderr


def test_reordering_keys_reruns_nothing(finished_study, tmp_path):
    config = yaml.safe_load((finished_study / "study.yaml").read_text())
    reordered = tmp_path / "reordered.yaml"
    reordered.write_text(yaml.safe_dump(config, sort_keys=True))
    assert reordered.read_text() != (finished_study / "study.yaml").read_text()
    result = run_snakemake(finished_study, "--dry-run", configfile=reordered)
    assert result.returncode == 0, result.stderr
    assert "Nothing to be done" in result.stdout + result.stderr


def test_changing_one_variant_reruns_only_its_chain(finished_study, tmp_path):
    config = yaml.safe_load((finished_study / "study.yaml").read_text())
    config["variants"]["w8-language"][0]["bits"] = 6
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    result = run_snakemake(finished_study, "--dry-run", configfile=changed)
    assert result.returncode == 0, result.stderr
    # Four models carry the variant; per model: 1 compress, 2 tasks x 2 shards, 2 gathers, 2 scores.
    assert _job_counts(result.stdout) == {
        "compress": 4,
        "infer": 16,
        "gather_predictions": 8,
        "score": 8,
        "tables": 1,
        "plots": 1,
        "all": 1,
    }
    variants = re.findall(r"wildcards:.*variant=([\w-]+)", result.stdout)
    assert len(variants) == 36 and set(variants) == {"w8-language"}


def test_changing_a_task_setting_reruns_only_that_task(finished_study, tmp_path):
    config = yaml.safe_load((finished_study / "study.yaml").read_text())
    config["inference"]["retrieval_k"] = 4
    config["datasets"]["shapes-colors"]["templates"] = ["a photo of a {}.", "a {} picture."]
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    result = run_snakemake(finished_study, "--dry-run", configfile=changed)
    assert result.returncode == 0, result.stderr
    # 2 contrastive models x 2 variants x 2 tasks: 2 shards, 1 gather, 1 score each; no data, model or
    # compression job.
    assert _job_counts(result.stdout) == {
        "infer": 16,
        "gather_predictions": 8,
        "score": 8,
        "tables": 1,
        "plots": 1,
        "all": 1,
    }
    assert set(re.findall(r"wildcards:.*task=(\w+)", result.stdout)) == {"retrieval", "classification"}
