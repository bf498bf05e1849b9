"""The miniature study runs end to end, reruns nothing, and reruns only what a change invalidates."""

from __future__ import annotations

import base64
import os
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
    # Each variant's steps, from its manifest: the method and its settings; "none" without steps.
    variants = pd.read_parquet(finished_study / "results/tables/variants.parquet")
    w8 = variants[variants["variant"] == "w8-language"]
    assert set(w8["method"]) == {"uniform"} and set(w8["bits"]) == {8} and set(w8["part"]) == {"language"}
    assert set(variants.loc[variants["variant"] == "baseline", "method"]) == {"none"}
    assert set(summary.loc[summary["variant"] == "w8-language", "method"]) == {"uniform"}
    # Profiling is off in this study: an empty efficiency table with its columns.
    efficiency = pd.read_parquet(finished_study / "results/tables/efficiency.parquet")
    assert efficiency.empty and "measure" in efficiency.columns
    assert scores["git_sha"].notna().all() and scores["config_hash"].str.len().eq(16).all()
    assert (scores["n_samples"] == 12).all()
    # One file per figure the study has data for (no sweep, SVD or pruning here), none other.
    figures = ["quality_vs_size", "quality_vs_cost", "quality_vs_bits", "task_bars", "confusion", "examples"]
    for png in figures:
        assert (finished_study / "results/plots" / f"{png}.png").stat().st_size > 10_000
    assert (finished_study / "results/plots/dropoff_3d.html").stat().st_size > 1_000_000
    assert sorted(p.name for p in (finished_study / "results/plots").iterdir()) == sorted(
        [f"{f}.png" for f in figures] + ["dropoff_3d.html"]
    )
    # The HTML report: every figure with data (no sweep here), every configuration, the study file.
    page = (finished_study / "results/report/index.html").read_text()
    for figure in [*figures, "dropoff_3d"]:
        assert f'id="fig-{figure}"' in page, figure
    assert (finished_study / "results/report/dropoff_3d.html").is_file()
    assert "scaling: the efficiency table has no sweep rows" in page
    assert len(pd.read_csv(finished_study / "results/report/configurations.csv")) == len(summary)
    assert "study: shapes-test" in page


def test_snakemake_report_has_every_figure_with_its_caption(finished_study, tmp_path):
    """`snakemake --report` assembles the figure jobs' outputs with their captions, by category."""
    from vlmopt.study import FIGURES

    out = tmp_path / "report.html"
    result = run_snakemake(
        finished_study, "--cores", "1", "--report", str(out), configfile=finished_study / "study.yaml"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    page = out.read_text()
    shown = ["quality_vs_size", "quality_vs_cost", "quality_vs_bits", "dropoff_3d", "task_bars", "confusion"]
    for name in [*shown, "examples"]:
        caption, category = FIGURES[name].caption, FIGURES[name].category
        # The caption's opening words (rendered from the figure rule's caption param) and its category.
        assert caption.split(":")[0].split(",")[0][:30] in page, name
        assert category in page, name
    # Figures the miniature study has no data for are not in it.
    assert FIGURES["svd"].caption[:40] not in page and FIGURES["pruning"].caption[:40] not in page


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
        "figure": 7,
        "html_report": 1,
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
        "figure": 7,
        "html_report": 1,
        "all": 1,
    }
    assert set(re.findall(r"wildcards:.*task=(\w+)", result.stdout)) == {"retrieval", "classification"}


def test_changing_a_dataset_setting_reruns_what_reads_it(finished_study, tmp_path):
    config = yaml.safe_load((finished_study / "study.yaml").read_text())
    config["datasets"]["shapes-colors"]["n_test"] = 10
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    result = run_snakemake(finished_study, "--dry-run", configfile=changed)
    assert result.returncode == 0, result.stderr
    # The colour-labelled set feeds classification only: 2 models x 2 variants, 2 shards each.
    assert _job_counts(result.stdout) == {
        "prepare_dataset": 1,
        "infer": 8,
        "gather_predictions": 4,
        "score": 4,
        "tables": 1,
        "figure": 7,
        "html_report": 1,
        "all": 1,
    }
    assert set(re.findall(r"wildcards:.*dataset=([\w-]+)", result.stdout)) == {"shapes-colors"}


def test_profiling_a_finished_study(finished_study, tmp_path):
    """Turning profiling on plans the profiles and the tables, nothing else; a profile has every row."""
    config = yaml.safe_load((finished_study / "study.yaml").read_text())
    config["profiling"]["enabled"] = True
    changed = tmp_path / "profiled.yaml"
    changed.write_text(yaml.safe_dump(config))
    result = run_snakemake(finished_study, "--dry-run", configfile=changed)
    assert result.returncode == 0, result.stderr
    # One profile per (model, ft, variant), each timing every task of the variant.
    assert _job_counts(result.stdout) == {"profile": 11, "tables": 1, "figure": 7, "html_report": 1, "all": 1}
    target = "results/profile/blip-tiny/full/w8-language.parquet"
    result = run_snakemake(finished_study, "--", target, configfile=changed)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = pd.read_parquet(finished_study / target)
    assert set(rows["task"]) == {"captioning", "vqa"} and set(rows["dataset"]) == {"shapes"}
    # w8-language is simulated 8-bit quantization: its timings are the dense model's, and say so.
    assert set(rows["batch_size"]) == {2} and rows["simulated"].all()
    notes = rows.set_index(["task", "measure"])["note"]
    assert "latency and memory are the dense model's" in notes[("captioning", "latency_ms_p50")]
    values = rows.set_index(["task", "measure"])["value"]
    for task in ("captioning", "vqa"):
        for measure in ("latency_ms_p50", "prefill_ms_p50", "peak_mem_mb", "gflops_per_token_per_sample", "size_bytes"):
            assert values[(task, measure)] > 0, (task, measure)
    log = (finished_study / "logs/profile/blip-tiny/full/w8-language.log").read_text()
    assert "captioning: latency" in log and "vqa: latency" in log
    (finished_study / target).unlink()  # the other tests expect the study as it was


def test_sweeping_a_finished_study(finished_study, tmp_path):
    """A profiling sweep plans one job per value for the variants sweep_on picks, and the figure."""
    config = yaml.safe_load((finished_study / "study.yaml").read_text())
    config["profiling"].update(
        enabled=True,
        sweep={"batch_size": [1, 3], "attn_implementation": ["sdpa"]},
        sweep_on={"models": ["blip2-tiny"], "finetune": ["none"]},
    )
    changed = tmp_path / "swept.yaml"
    changed.write_text(yaml.safe_dump(config))
    result = run_snakemake(finished_study, "--dry-run", configfile=changed)
    assert result.returncode == 0, result.stderr
    counts = _job_counts(result.stdout)
    # blip2-tiny/none has one variant (baseline): three points; the profiles of all 11 variants too.
    assert counts == {"profile": 11, "sweep": 3, "tables": 1, "figure": 8, "html_report": 1, "all": 1}
    target = "results/sweep/blip2-tiny/none/baseline/batch_size-3.parquet"
    result = run_snakemake(finished_study, "--", target, configfile=changed)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = pd.read_parquet(finished_study / target)
    assert set(rows["sweep_axis"]) == {"batch_size"} and set(rows["sweep_value"]) == {"3"}
    assert set(rows["batch_size"]) == {3} and set(rows["task"]) == {"captioning", "vqa"}
    values = rows.set_index(["task", "measure"])["value"]
    assert values[("captioning", "latency_ms_p50")] > 0 and values[("vqa", "gflops_per_sample")] > 0
    # The sweep's settings reach the sweep jobs only: the profiles' params do not change with them.
    config["profiling"]["sweep"]["batch_size"] = [1, 2, 3]
    changed.write_text(yaml.safe_dump(config))
    result = run_snakemake(finished_study, "--dry-run", configfile=changed)
    assert _job_counts(result.stdout) == {
        "profile": 11,
        "sweep": 3,
        "tables": 1,
        "figure": 8,
        "html_report": 1,
        "all": 1,
    }
    (finished_study / target).unlink()  # the other tests expect the study as it was


def _snakemake_cmd(workdir, *args):
    from .conftest import REPO, SNAKEMAKE

    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile"]
    return [*cmd, str(workdir / "study.yaml"), *args]


def test_editing_a_library_module_reruns_the_stages_that_use_it(finished_study, tmp_path):
    import shutil
    import subprocess

    import vlmopt

    # A copy of the library, first on the import path, with one metric module edited.
    copy = tmp_path / "src" / "vlmopt"
    shutil.copytree(vlmopt.__path__[0], copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "metrics" / "vqa.py").open("a") as f:
        f.write("\n# an edit\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tmp_path / "src")}
    cmd = _snakemake_cmd(finished_study, "--dry-run", "--cores", "2")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=finished_study)
    assert result.returncode == 0, result.stderr[-4000:]
    # Every score job reads vlmopt.metrics (the code digest of the score stage changed); nothing upstream.
    assert _job_counts(result.stdout) == {"score": 21, "tables": 1, "figure": 7, "html_report": 1, "all": 1}
    assert "Params have changed since last execution" in result.stdout


@pytest.fixture
def study_copy(finished_study, tmp_path):
    import shutil

    copy = tmp_path / "study"
    shutil.copytree(finished_study, copy, symlinks=True)
    return copy


def _run_until(cmd, workdir, done, timeout=300.0):
    """Start snakemake in its own process group and SIGKILL the group as soon as ``done()`` holds."""
    import signal
    import subprocess
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    try:
        while not done():
            if proc.poll() is not None:
                raise AssertionError(f"snakemake ended before the kill: {proc.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("the awaited state never came")
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Snakemake itself was killed too (a node failure): its lock stays until --unlock.
    unlock = subprocess.run([*cmd, "--unlock"], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert unlock.returncode == 0, unlock.stderr[-3000:]


def test_killed_finetuning_resumes_from_its_last_checkpoint(study_copy):
    import json
    import subprocess

    config = yaml.safe_load((study_copy / "study.yaml").read_text())
    config["finetune"]["realgen"].update(epochs=20, max_steps=60, checkpoint_every=5)
    (study_copy / "study.yaml").write_text(yaml.safe_dump(config))
    target = "results/finetuned/blip-tiny/realgen"
    state = study_copy / "results/checkpoints/blip-tiny/realgen/last/state.json"

    def checkpointed():
        try:
            return json.loads(state.read_text())["step"] >= 5
        except (OSError, ValueError):
            return False

    _run_until(_snakemake_cmd(study_copy, "--cores", "1", target), study_copy, checkpointed)
    killed_at = json.loads(state.read_text())["step"]
    assert killed_at < 60
    # Nothing the kill left is trusted: the finetuning job is planned again.
    dry = subprocess.run(
        _snakemake_cmd(study_copy, "--cores", "1", "--dry-run", target), capture_output=True, text=True, timeout=600
    )
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert _job_counts(dry.stdout) == {"finetune": 1}
    done = subprocess.run(
        _snakemake_cmd(study_copy, "--cores", "1", target), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((study_copy / target / "finetune.json").read_text())
    assert summary["resumed_from_step"] >= 5 and summary["steps"] == 60
    assert "resumed finetuning from" in (study_copy / "logs/finetune/blip-tiny/realgen.log").read_text()
    assert not state.parent.exists()  # checkpoints are removed once the model is saved


def test_killed_inference_keeps_its_finished_shards(tmp_path):
    import subprocess

    import pandas as pd

    study = {
        "study": "shards",
        "datasets": {"shapes": {"source": "synthetic", "n_train": 8, "n_val": 2, "n_test": 12}},
        "models": {"blip-tiny": {"source": "tiny:blip", "tokenizer_dataset": "shapes"}},
        "variants": {"baseline": []},
        "runs": [
            {"models": ["blip-tiny"], "finetune": ["none"], "variants": ["baseline"], "tasks": {"captioning": "shapes"}}
        ],
        "inference": {"batch_size": 4, "shards": 2, "max_new_tokens": 4},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    folder = "results/predictions/blip-tiny/none/baseline/captioning/shapes"
    target = f"{folder}/predictions.parquet"
    shards = [f"{folder}/shard-{i}-of-2.parquet" for i in (1, 2)]

    def recorded(rel):
        # Snakemake has registered the job as finished: metadata written, no incomplete marker.
        name = base64.urlsafe_b64encode(rel.encode()).decode()
        meta = tmp_path / ".snakemake" / "metadata" / name
        return meta.exists() and not (tmp_path / ".snakemake" / "incomplete" / name).exists()

    # One job at a time: kill as soon as the first shard is done, while the second runs.
    _run_until(_snakemake_cmd(tmp_path, "--cores", "1", target), tmp_path, lambda: any(map(recorded, shards)))
    finished = [i for i, rel in enumerate(shards, 1) if recorded(rel)]
    assert len(finished) == 1
    other = 3 - finished[0]
    kept = tmp_path / shards[finished[0] - 1]
    before = (kept.stat().st_ino, kept.stat().st_mtime_ns)
    dry = subprocess.run(
        _snakemake_cmd(tmp_path, "--cores", "1", "--dry-run", target), capture_output=True, text=True, timeout=600
    )
    assert dry.returncode == 0, dry.stderr[-3000:]
    # Only the unfinished shard is predicted again.
    assert _job_counts(dry.stdout) == {"infer": 1, "gather_predictions": 1}
    assert f"shard={other}-of-2" in dry.stdout and f"shard={finished[0]}-of-2" not in dry.stdout
    done = subprocess.run(_snakemake_cmd(tmp_path, "--cores", "1", target), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) == before  # the finished shard was not redone
    merged = pd.read_parquet(tmp_path / target)
    assert list(merged["sample_id"]) == list(
        pd.read_parquet(tmp_path / "resources/data/shapes/test.parquet")["sample_id"]
    )


def test_a_failing_job_log_names_the_cause(tmp_path):
    import subprocess

    study = {
        "study": "broken",
        "datasets": {"fake": {"source": "genimage-biggan", "path": str(tmp_path / "no-such-folder")}},
        "models": {"m": {"source": "tiny:clip", "tokenizer_dataset": "fake"}},
        "variants": {"baseline": []},
        "runs": [
            {"models": ["m"], "finetune": ["none"], "variants": ["baseline"], "tasks": {"classification": "fake"}}
        ],
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    cmd = _snakemake_cmd(tmp_path, "--cores", "1", "resources/data/fake/test.parquet")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode != 0
    log = (tmp_path / "logs/prepare_dataset/fake.log").read_text()
    assert "no-such-folder" in log and "FileNotFoundError" in log
    assert "logs/prepare_dataset/fake.log" in result.stdout + result.stderr
