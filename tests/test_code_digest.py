"""Each stage's code digest covers the library modules it can import, and only those."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

import vlmopt
from vlmopt.code_digest import STAGES, stage_digest, stage_modules

SRC = Path(vlmopt.__file__).resolve().parent


def test_stages_reach_their_modules_and_not_others():
    score = stage_modules("score")
    assert {"vlmopt.metrics.caption", "vlmopt.metrics.vqa", "vlmopt.metrics.real_vs_generated"} <= set(score)
    assert "vlmopt.compress.gptq" not in score and "vlmopt.finetune.full" not in score
    compress = stage_modules("compress")
    assert {"vlmopt.compress.gptq", "vlmopt.compress.awq", "vlmopt.models.blip"} <= set(compress)
    assert "vlmopt.metrics.caption" not in compress
    infer = stage_modules("infer")
    assert {"vlmopt.infer", "vlmopt.models.clip", "vlmopt.tasks"} <= set(infer)
    assert "vlmopt.metrics.vqa" not in infer
    figure = stage_modules("figure")
    plots = ("static", "tradeoffs", "labels", "dropoff", "interactive", "svd", "pruning", "examples", "scaling")
    assert {f"vlmopt.plots.{m}" for m in plots} | {"vlmopt.report"} <= set(figure)
    assert not any(m == "vlmopt.infer" or m.startswith("vlmopt.profiling") for m in figure)
    profile = stage_modules("profile")
    assert {"vlmopt.profiling.variant", "vlmopt.profiling.flops", "vlmopt.device", "vlmopt.models.blip"} <= set(profile)
    assert not any(m.startswith("vlmopt.metrics") for m in profile)
    with pytest.raises(ValueError, match="unknown stage 'scoring'"):
        stage_digest("scoring")


@pytest.fixture
def copy(tmp_path):
    root = tmp_path / "vlmopt"
    shutil.copytree(SRC, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_an_edit_changes_the_digests_of_the_stages_that_import_it(copy):
    before = {stage: stage_digest(stage, copy) for stage in STAGES}
    assert before == {stage: stage_digest(stage) for stage in STAGES}  # same bytes, same digest
    with (copy / "metrics" / "vqa.py").open("a") as f:
        f.write("\n# edited\n")
    after = {stage: stage_digest(stage, copy) for stage in STAGES}
    changed = {stage for stage in STAGES if before[stage] != after[stage]}
    assert changed == {stage for stage in STAGES if "vlmopt.metrics.vqa" in stage_modules(stage)}
    assert "score" in changed and "infer" not in changed and "compress" not in changed


def test_an_edit_to_a_stage_function_changes_only_that_stage(copy):
    before = {stage: stage_digest(stage, copy) for stage in STAGES}
    path = copy / "pipeline" / "predict.py"
    lines = path.read_text().splitlines(keepends=True)
    function = next(
        n for n in ast.parse("".join(lines)).body if isinstance(n, ast.FunctionDef) and n.name == "gather_predictions"
    )
    at = function.body[-1].lineno - 1  # a comment before the function's last statement
    path.write_text("".join([*lines[:at], "    # edited\n", *lines[at:]]))
    after = {stage: stage_digest(stage, copy) for stage in STAGES}
    assert {stage for stage in STAGES if before[stage] != after[stage]} == {"gather_predictions"}


def test_stages_that_do_not_score_ignore_the_scorers_and_the_packages_they_pass_through(copy):
    # The task definitions import their scorers (vlmopt.metrics) inside score(); inference reaches
    # the tasks for prompts only. A package's __init__ reached as the parent of a module counts
    # with its bytes, without what it re-exports: the sweep axes do not pull in the figure table.
    infer, score, profile = (set(stage_modules(s)) for s in ("infer", "score", "profile"))
    assert "vlmopt.tasks.vqa" in infer and not any(m.startswith("vlmopt.metrics") for m in infer)
    assert "vlmopt.metrics.vqa" in score
    assert {"vlmopt.study", "vlmopt.study.sweep"} <= profile and "vlmopt.study.figures" not in profile
    before = {stage: stage_digest(stage, copy) for stage in ("profile", "figure", "infer")}
    with (copy / "study" / "figures.py").open("a") as f:
        f.write("\n# edited\n")
    with (copy / "metrics" / "caption.py").open("a") as f:
        f.write("\n# edited\n")
    after = {stage: stage_digest(stage, copy) for stage in ("profile", "figure", "infer")}
    assert before["profile"] == after["profile"] and before["infer"] == after["infer"]
    assert before["figure"] != after["figure"]
