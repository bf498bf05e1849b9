from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def run_snakemake(workdir: Path, *args: str, configfile: Path | None = None, timeout: int = 900):
    """Run snakemake on the repository's Snakefile in ``workdir``; returns the CompletedProcess."""
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2"]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=workdir)


@pytest.fixture
def workdir(tmp_path):
    """A working directory with its own copy of the test study config."""
    shutil.copy(REPO / "tests" / "workflow" / "config.yaml", tmp_path / "study.yaml")
    return tmp_path
