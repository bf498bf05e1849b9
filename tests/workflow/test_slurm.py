"""A part of the miniature study through a real SLURM cluster (profiles/slurm) equals the same part run locally.

tests/slurm/start-local-slurm.sh starts a one-node cluster on this machine (installing slurm-wlm and
munge with apt-get if needed, hence root); the run uses profiles/slurm unchanged, plus the overlay
tests/slurm/profile for what that cluster lacks (no accounting database, so squeue answers status
queries; 2 CPUs). Skipped where the machine does not allow it, or with VLMOPT_SLURM_TEST=0;
VLMOPT_SLURM_TEST=full sends the whole chain through SLURM.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from .conftest import REPO, run_snakemake, snakemake_command

pytestmark = pytest.mark.slurm

START = REPO / "tests" / "slurm" / "start-local-slurm.sh"
STOP = REPO / "tests" / "slurm" / "stop-local-slurm.sh"
OVERLAY = REPO / "tests" / "slurm" / "profile"
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")
# One evaluation of the study, inference and scoring: its two inference shards (a GPU rule), their
# merge (inside Snakemake) and scoring (a CPU rule). Every SLURM job starts Snakemake twice (sbatch,
# then srun), which takes about half a minute on 2 cores, so the data and models it reads (UPSTREAM)
# come from the local run. VLMOPT_SLURM_TEST=full runs the whole chain through SLURM instead
# (dataset, model, finetuning, compression: about 6 minutes).
CHAIN = "blip-tiny/full/w8-language/captioning/shapes"
TARGETS = [f"results/scores/{CHAIN}/scores.parquet"]
FULL = os.environ.get("VLMOPT_SLURM_TEST") == "full"
UPSTREAM = (
    []
    if FULL
    else [
        "resources/data/shapes",
        "resources/models/blip-tiny",
        "results/finetuned/blip-tiny/full",
        "results/models/blip-tiny/full/w8-language",
    ]
)
SUBMITTED = ["prepare_dataset", "build_model", "finetune", "compress"] * FULL + ["infer", "infer", "score"]
GPU_RULES = {"finetune", "compress", "infer", "label_dataset", "profile"}
# Seconds before a run is killed (SIGKILL: a snakemake waiting on jobs ignores SIGTERM).
RUN_LIMIT_S = 900


def _state_dir() -> Path:
    return Path(os.environ.get("VLMOPT_SLURM_DIR", "/tmp/vlmopt-slurm"))


def _why_not_here() -> str | None:
    """Why this machine cannot run the test, or None."""
    if os.environ.get("VLMOPT_SLURM_TEST", "1") == "0":
        return "VLMOPT_SLURM_TEST=0"
    if not sys.platform.startswith("linux"):
        return "the local SLURM cluster needs Linux"
    if os.geteuid() != 0:
        return "needs root: tests/slurm/start-local-slurm.sh installs slurm-wlm and munge and runs slurmctld as root"
    installed = all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not installed and not shutil.which("apt-get"):
        return "slurm-wlm and munge are not installed and there is no apt-get to install them"
    ours = (_state_dir() / "etc" / "slurm.conf").resolve()
    if DEFAULT_CONF.exists() and not (DEFAULT_CONF.is_symlink() and DEFAULT_CONF.resolve() == ours):
        return f"{DEFAULT_CONF} belongs to another SLURM configuration on this machine"
    if not shutil.which("timeout"):
        return "needs coreutils' timeout"
    return None


@pytest.fixture(scope="module")
def slurm_conf():
    """The running test cluster's slurm.conf; the cluster stops after this module if it started here."""
    reason = _why_not_here()
    if reason:
        pytest.skip(f"no local SLURM cluster: {reason}")
    state = _state_dir()
    started = subprocess.run([str(START), str(state)], capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        # Whatever did start (daemons, the configuration link) goes again.
        subprocess.run([str(STOP), str(state)], capture_output=True, text=True, timeout=120)
        pytest.fail(
            f"tests/slurm/start-local-slurm.sh failed (exit {started.returncode}):\n{started.stdout}{started.stderr}"
        )
    yield (state / "etc" / "slurm.conf").resolve()
    if "already running" not in started.stdout:
        subprocess.run([str(STOP), str(state)], capture_output=True, text=True, timeout=120)


def _start(workdir: Path, *args: str, env: dict[str, str] | None = None, nice: bool = False) -> subprocess.Popen:
    """Start snakemake for TARGETS in ``workdir`` (output in snakemake.out), killed after RUN_LIMIT_S."""
    cmd, run_env = snakemake_command(workdir, *args, "--", *TARGETS, configfile=workdir / "study.yaml", env=env)
    cmd = ["timeout", "-s", "KILL", str(RUN_LIMIT_S), *cmd]
    if nice:
        cmd = ["nice", "-n", "19", *cmd]
    with open(workdir / "snakemake.out", "w") as log:
        # A session of its own, so that _stop can end snakemake and its local jobs together.
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env, cwd=workdir, start_new_session=True
        )


def _stop(process: subprocess.Popen, workdir: Path, conf: Path | None = None) -> None:
    """End a run that is still going (after a failure elsewhere), and its SLURM jobs if ``conf`` is given."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if conf is not None:
        out = (workdir / "snakemake.out").read_text()
        job_ids = re.findall(r"submitted with SLURM jobid (\d+)", out) + re.findall(r"SLURM job ID (\d+)\.", out)
        if job_ids:
            env = {**os.environ, "SLURM_CONF": str(conf)}
            subprocess.run(["scancel", *job_ids], capture_output=True, timeout=30, env=env)


def _finish(process: subprocess.Popen, workdir: Path, what: str) -> str:
    process.wait(timeout=RUN_LIMIT_S + 60)
    out = (workdir / "snakemake.out").read_text()
    assert process.returncode == 0, f"{what} run failed (exit {process.returncode}):\n{out[-6000:]}"
    return out


def _slurm_job_ids(out: str) -> list[str]:
    """SLURM ids of the jobs a run submitted: single jobs, and ``<array>_<task>`` for array tasks."""
    ids = re.findall(r"submitted with SLURM jobid (\d+)", out)
    for array, first, last in re.findall(r"SLURM job ID (\d+)\. The individual task IDs are (\d+)-(\d+)\.", out):
        ids += [f"{array}_{task}" for task in range(int(first), int(last) + 1)]
    return ids


def _job_fields(slurm_job_id: str, conf: Path) -> dict[str, str]:
    shown = subprocess.run(
        ["scontrol", "show", "job", slurm_job_id],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SLURM_CONF": str(conf)},
    )
    assert shown.returncode == 0, shown.stderr
    return dict(re.findall(r"(\w[\w/:]*)=(\S*)", shown.stdout))


def _workdir(path: Path) -> Path:
    path.mkdir()
    shutil.copy(REPO / "tests" / "workflow" / "config.yaml", path / "study.yaml")
    return path


def test_slurm_run_equals_local_run(slurm_conf, tmp_path):
    slurm_dir, local_dir = _workdir(tmp_path / "slurm"), _workdir(tmp_path / "local")
    if UPSTREAM:
        # The last path needs all the others.
        built = run_snakemake(local_dir, "--", UPSTREAM[-1], configfile=local_dir / "study.yaml", timeout=RUN_LIMIT_S)
        assert built.returncode == 0, built.stderr[-6000:]
        for path in UPSTREAM:
            shutil.copytree(local_dir / path, slurm_dir / path)  # keeps modification times
    # Both runs at once: the SLURM run mostly waits for its status checks, and the local one, on one
    # core at the lowest priority, takes the CPU time that the SLURM jobs leave.
    # The test cluster's node advertises GPUs (gres) that do not exist: jobs given one with this
    # CPU-only torch would stop at start (vlmopt.device.require_usable_gpu), unless told to run on
    # the CPU on purpose.
    slurm = _start(
        slurm_dir, "--profile", str(REPO / "profiles" / "slurm"), "--profile", str(OVERLAY),
        env={"SLURM_CONF": str(slurm_conf), "VLMOPT_DEVICE": "cpu"},
    )  # fmt: skip
    local = _start(local_dir, "--cores", "1", nice=True)
    try:
        out = _finish(slurm, slurm_dir, "SLURM")
        _finish(local, local_dir, "local")
    finally:
        _stop(local, local_dir)
        if slurm.returncode != 0:
            _stop(slurm, slurm_dir, slurm_conf)

    # Every job but the shards' merge went through SLURM, each to its partition, one task each;
    # GPU jobs with one GPU. The two inference shards went as one job array (slurm-array-jobs).
    submitted = {job_id: _job_fields(job_id, slurm_conf) for job_id in _slurm_job_ids(out)}
    rules = {i: re.match(r"rule_(\w+?)(?:_wildcards_|$)", f["Comment"]).group(1) for i, f in submitted.items()}
    assert sorted(rules.values()) == sorted(SUBMITTED), out[-6000:]
    arrays = {job_id: f.get("ArrayJobId") for job_id, f in submitted.items() if rules[job_id] == "infer"}
    assert len(set(arrays.values())) == 1 and None not in arrays.values(), arrays
    for job_id, fields in submitted.items():
        rule = rules[job_id]
        assert fields["JobState"] == "COMPLETED", (rule, fields)
        assert fields["NumTasks"] == "1", (rule, fields)
        if rule in GPU_RULES:
            assert fields["Partition"] == "gpu" and fields.get("TresPerJob") == "gres:gpu:1", (rule, fields)
        else:
            assert fields["Partition"] == "cpu" and "gpu" not in fields.get("TresPerJob", ""), (rule, fields)

    # Same predictions, word for word, and the same scores.
    predictions = f"results/predictions/{CHAIN}/predictions.parquet"
    pd.testing.assert_frame_equal(
        pd.read_parquet(slurm_dir / predictions), pd.read_parquet(local_dir / predictions), check_exact=True
    )
    keys = ["model", "ft", "variant", "task", "dataset", "metric"]
    columns = [*keys, "value", "n_samples", "n_failed", "config_hash"]
    for target in TARGETS:
        via_slurm = pd.read_parquet(slurm_dir / target)[columns].sort_values(keys, ignore_index=True)
        local_scores = pd.read_parquet(local_dir / target)[columns].sort_values(keys, ignore_index=True)
        assert len(via_slurm) > 0
        pd.testing.assert_frame_equal(via_slurm, local_scores, check_exact=True)
