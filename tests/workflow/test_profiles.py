"""The SLURM profile resolves: GPU rules ask for one GPU, scoring runs without one, memory grows per attempt."""

from __future__ import annotations

import re

import yaml

from .conftest import REPO, run_snakemake

PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
GPU_RULES = ("finetune", "compress", "infer", "label_dataset", "profile", "sweep")
CPU_RULES = ("score", "tables", "figure", "html_report", "prepare_dataset", "build_model")


def _resources_by_rule(dry_run_output: str) -> dict[str, list[str]]:
    """Each rule's resource lines; a job's block starts with ``rule <name>:`` or, for a checkpoint
    (prepare_dataset, label_dataset), ``checkpoint <name>:``."""
    found: dict[str, list[str]] = {}
    parts = re.split(r"^(?:rule|checkpoint) (\w+):$", dry_run_output, flags=re.MULTILINE)
    for rule, block in zip(parts[1::2], parts[2::2], strict=True):
        m = re.search(r"resources: (.*)", block)
        if m:
            found.setdefault(rule, []).append(m.group(1))
    return found


def test_slurm_profile_places_rules(workdir):
    # The miniature study turns profiling off; on here, with a sweep, so that the profile, sweep and
    # figure of the sweep's curves are placed too.
    study = yaml.safe_load((workdir / "study.yaml").read_text())
    study["profiling"].update(enabled=True, sweep={"batch_size": [1, 2]}, sweep_on={"variants": ["baseline"]})
    (workdir / "study.yaml").write_text(yaml.safe_dump(study))
    result = run_snakemake(
        workdir, "--dry-run", "--profile", str(REPO / "profiles" / "slurm"), configfile=workdir / "study.yaml"
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    resources = _resources_by_rule(result.stdout)
    for rule in GPU_RULES:
        assert resources[rule], rule
        for line in resources[rule]:
            assert "gpu=1" in line and "slurm_partition=gpu" in line, (rule, line)
            assert "tasks=1" in line and "mem_mb=32000" in line, (rule, line)
    for rule in CPU_RULES:
        assert resources[rule], rule
        for line in resources[rule]:
            assert "gpu=" not in line and "slurm_partition=cpu" in line, (rule, line)
            assert "tasks=1" in line, (rule, line)
    assert all("mem_mb=8000" in line for line in resources["score"])
    # Every submitted rule has a time limit.
    for rule in (*GPU_RULES, *CPU_RULES):
        assert all(re.search(r"runtime=\d+", line) for line in resources[rule]), rule


def test_slurm_profile_grows_with_retries_and_sets_every_rule():
    profile = yaml.safe_load(PROFILE.read_text())
    assert profile["executor"] == "slurm" and profile["retries"] >= 1
    per_rule = profile["set-resources"]
    for settings in [profile["default-resources"], *per_rule.values()]:
        for key in ("mem_mb", "runtime"):
            if key in settings:
                assert "attempt" in str(settings[key]), settings
    for rule in GPU_RULES:
        assert per_rule[rule]["gpu"] == 1 and per_rule[rule]["tasks"] == 1, rule
        assert per_rule[rule]["slurm_partition"] != profile["default-resources"]["slurm_partition"], rule
        assert profile["set-threads"][rule] > 1, rule
    for rule in CPU_RULES:
        assert "gpu" not in per_rule.get(rule, {}) and "slurm_partition" not in per_rule.get(rule, {}), rule
        assert rule in profile["set-threads"], rule


def test_slurm_test_overlay_changes_no_setting_of_the_profile():
    # A later --profile replaces whole top-level keys: the test cluster's overlay must only add keys,
    # so that the SLURM test runs profiles/slurm's own settings.
    overlay = yaml.safe_load((REPO / "tests" / "slurm" / "profile" / "config.yaml").read_text())
    profile = yaml.safe_load(PROFILE.read_text())
    assert overlay and not set(overlay) & set(profile), set(overlay) & set(profile)
