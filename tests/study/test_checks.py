"""Task names a study uses are checked against the task registry (the schema lists none)."""

from __future__ import annotations

import copy

import pytest

from vlmopt.study import StudyError, check_study

STUDY = {
    "datasets": {"d": {"source": "synthetic"}},
    "models": {"a": {"source": "x/a"}},
    "finetune": {"full": {"method": "full", "dataset": "d", "tasks": ["captioning", "vqa"]}},
    "variants": {
        "baseline": [],
        "lora": [{"method": "lora", "dataset": "d", "targets": ["q_proj"], "training": {"tasks": ["captioning"]}}],
    },
    "runs": [{"models": ["a"], "finetune": ["none", "full"], "variants": "all", "tasks": {"captioning": "d"}}],
    "inference": {"generation": {"vqa": {"num_beams": 3}}},
}


def _with(change):
    config = copy.deepcopy(STUDY)
    change(config)
    return config


def test_a_study_of_registered_tasks_passes():
    check_study(copy.deepcopy(STUDY))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda c: c["runs"][0]["tasks"].update(ocr="d"),
            r"runs\[0\]\.tasks\.ocr: unknown task 'ocr'; tasks: captioning",
        ),
        (lambda c: c["finetune"]["full"]["tasks"].append("ocr"), r"finetune\.full\.tasks: unknown task 'ocr'"),
        (
            lambda c: c["variants"]["lora"][0]["training"]["tasks"].append("ocr"),
            r"variants\.lora\[0\]\.training\.tasks: unknown task 'ocr'",
        ),
        (
            lambda c: c["inference"]["generation"].update(retrieval={"num_beams": 2}),
            r"inference\.generation\.retrieval: not a task that generates text; generative tasks: captioning, vqa",
        ),
    ],
    ids=["run", "finetune", "lora-training", "generation"],
)
def test_an_unknown_task_is_named_with_its_key(change, match):
    with pytest.raises(StudyError, match=match):
        check_study(_with(change))
