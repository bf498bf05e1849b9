"""The workflow and the code pass the linters that CI and contributors run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import REPO, SNAKEMAKE

BIN = Path(sys.executable).parent


def _run(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)


def test_ruff():
    result = _run(str(BIN / "ruff"), "check", "src", "tests", "workflow/scripts")
    assert result.returncode == 0, result.stdout + result.stderr
    result = _run(str(BIN / "ruff"), "format", "--check", "src", "tests", "workflow/scripts")
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakefmt():
    result = _run(str(BIN / "snakefmt"), "--check", "Snakefile", "rules")
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakemake_lint_is_clean():
    result = _run(SNAKEMAKE, "--lint")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Lints for" not in out, out
