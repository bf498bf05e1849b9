from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
# SLURM_CONF of every run that uses no cluster: where SLURM's client tools are installed, the SLURM
# executor plugin runs `scontrol show config` at each Snakemake start, which waits about 9 s when
# the configured controller is down; this file makes scontrol stop at once (see the file).
NO_CLUSTER_CONF = REPO / "tests" / "slurm" / "no-cluster.conf"


def snakemake_command(
    workdir: Path, *args: str, configfile: Path | None = None, env: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a snakemake run on the repository's Snakefile in ``workdir``.

    ``env`` adds to (or overrides) the environment: a run through a real cluster passes its SLURM_CONF.
    """
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2"]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    run_env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLURM_CONF": str(NO_CLUSTER_CONF), **(env or {})}
    return [*cmd, *args], run_env


def run_snakemake(
    workdir: Path,
    *args: str,
    configfile: Path | None = None,
    timeout: int = 900,
    env: dict[str, str] | None = None,
):
    """Run snakemake on the repository's Snakefile in ``workdir``; returns the CompletedProcess."""
    cmd, run_env = snakemake_command(workdir, *args, configfile=configfile, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env, cwd=workdir)


@pytest.fixture(autouse=True, scope="session")
def _no_slurm_cluster():
    """The same SLURM_CONF for snakemake commands that tests start themselves (e.g. ``snakemake --lint``)."""
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(NO_CLUSTER_CONF)
    yield
    if before is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = before


@pytest.fixture
def workdir(tmp_path):
    """A working directory with its own copy of the test study config."""
    shutil.copy(REPO / "tests" / "workflow" / "config.yaml", tmp_path / "study.yaml")
    return tmp_path
