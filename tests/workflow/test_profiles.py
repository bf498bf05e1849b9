"""The SLURM profile resolves: GPU rules ask for one GPU, scoring runs without one, memory grows per attempt."""

from __future__ import annotations

import re

from .conftest import REPO, run_snakemake


def _resources_by_rule(dry_run_output: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for block in dry_run_output.split("rule ")[1:]:
        rule = block.split(":", 1)[0].strip()
        m = re.search(r"resources: (.*)", block)
        if m:
            found.setdefault(rule, []).append(m.group(1))
    return found


def test_slurm_profile_places_rules(workdir):
    result = run_snakemake(
        workdir, "--dry-run", "--profile", str(REPO / "profiles" / "slurm"), configfile=workdir / "study.yaml"
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    resources = _resources_by_rule(result.stdout)
    for rule in ("finetune", "compress", "infer"):
        assert resources[rule], rule
        for line in resources[rule]:
            assert "gpu=1" in line and "slurm_partition=gpu" in line, (rule, line)
            assert "mem_mb=32000" in line, (rule, line)
    for rule in ("score", "tables", "plots", "prepare_dataset"):
        for line in resources[rule]:
            assert "gpu=" not in line and "slurm_partition=cpu" in line, (rule, line)
    assert all("mem_mb=8000" in line for line in resources["score"])
