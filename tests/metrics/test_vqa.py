"""VQA accuracy against numbers produced by the official VQA evaluation code."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from vlmopt.metrics import vqa_accuracy
from vlmopt.metrics.vqa import normalize_answer, question_accuracy

FIXTURE = Path(__file__).parent / "fixtures" / "vqa.json"

# The expected numbers below were produced by the official evaluation code, VQAEval in
# GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py (master, commit a013f00; only its
# py2 print statements changed to print()), run on fixtures/vqa.json through minimal VQA/VQARes objects
# (getQuesIds() and qa) whose answer dicts carry answer_id 1..n as in the real annotations.
OFFICIAL_OVERALL = 60.36  # VQAEval(n=2).accuracy["overall"]
OFFICIAL_OVERALL_N10 = 60.3584229391  # VQAEval(n=10).accuracy["overall"]
OFFICIAL_PER_ANSWER_TYPE = {"yes/no": 47.67, "number": 70.0, "other": 64.6}  # accuracy["perAnswerType"]
OFFICIAL_PER_QUESTION = {  # VQAEval(n=2).evalQA
    "unanimous-exact": 100.0,
    "unanimous-case": 0.0,
    "unanimous-period": 0.0,
    "unanimous-number-word": 0.0,
    "unanimous-whitespace": 100.0,
    "mixed-case": 100.0,
    "mixed-minority": 60.0,
    "mixed-exclaim": 100.0,
    "number-words": 100.0,
    "none-is-zero": 100.0,
    "articles": 100.0,
    "contraction": 90.0,
    "decimal-period": 90.0,
    "comma-thousands": 100.0,
    "comma-range": 0.0,
    "comma-words": 90.0,
    "hyphen": 100.0,
    "slash-tab": 100.0,
    "one-agrees": 30.0,
    "two-agree": 60.0,
    "three-agree": 90.0,
    "wrong": 0.0,
    "empty-prediction": 0.0,
    "many-periods": 0.0,
    "possessive": 100.0,
    "three-answers": 44.44,
    "two-answers": 16.67,
    "single-answer": 0.0,
    "mixed-numbers-spaces": 100.0,
    "abbreviation": 100.0,
    "unanimous-after-strip": 0.0,
}


@pytest.fixture(scope="module")
def fixture():
    questions = json.loads(FIXTURE.read_text())["questions"]
    return (
        {q["id"]: q["prediction"] for q in questions},
        {q["id"]: q["answers"] for q in questions},
        {q["id"]: q["answer_type"] for q in questions},
    )


@pytest.fixture(scope="module")
def result(fixture):
    return vqa_accuracy(*fixture)


def test_overall_and_per_type_match_official(result):
    assert result["overall"] == OFFICIAL_OVERALL
    assert result["per_answer_type"] == OFFICIAL_PER_ANSWER_TYPE
    assert result["n_questions"] == len(OFFICIAL_PER_QUESTION)


def test_per_question_matches_official(result):
    assert list(result["per_question"]) == list(OFFICIAL_PER_QUESTION)
    assert {k: round(v, 2) for k, v in result["per_question"].items()} == OFFICIAL_PER_QUESTION


def test_per_question_is_unrounded_percent(result):
    per_question = list(result["per_question"].values())
    assert result["per_question"]["three-answers"] == pytest.approx(400 / 9)
    assert sum(per_question) / len(per_question) == pytest.approx(OFFICIAL_OVERALL_N10, abs=1e-9)


def test_without_answer_types(fixture):
    predictions, answers, _ = fixture
    result = vqa_accuracy(predictions, answers)
    assert result["overall"] == OFFICIAL_OVERALL
    assert result["per_answer_type"] == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A dog.", "dog"),
        ("The  Two  cats", "2 cats"),
        ("none", "0"),
        ("1,000", "1000"),
        ("2,500-3,000", "25003000"),  # a digit-comma-digit deletes every mark, the hyphen too
        ("red, white", "red white"),
        ("red,white", "red white"),
        ("T-Shirt", "t shirt"),
        ("3.5.", "3.5"),
        ("mr. smith", "mr smith"),
        ("dont know", "don't know"),
        ("Im here", "im here"),  # capitalised keys of the contraction map never match after lower-casing
        ("yes" + "." * 40, "yes" + "." * 8),  # only 32 periods are removed
        (" what?\n", "what"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_leave_one_out_examples():
    # The worked example of GT-Vision-Lab/VQA issue #1: 8 "yes" and 2 "no".
    answers = ["yes"] * 8 + ["no"] * 2
    assert question_accuracy("yes", answers) == 1.0
    assert question_accuracy("no", answers) == pytest.approx(0.6)
    assert question_accuracy("maybe", answers) == 0.0


def test_unanimous_answers_are_not_normalised():
    answers = ["yes"] * 10
    assert question_accuracy("yes", answers) == 1.0
    assert question_accuracy(" yes\t", answers) == 1.0
    assert question_accuracy("Yes", answers) == 0.0
    assert question_accuracy("Yes", ["yes"] * 9 + ["Yes"]) == 1.0


def test_short_answer_lists_follow_leave_one_out(caplog):
    with caplog.at_level(logging.WARNING, logger="vlmopt.metrics.vqa"):
        result = vqa_accuracy({"a": "cat", "b": "cat"}, {"a": ["cat"], "b": ("cat", "cat", "cat", "cat")})
    assert result["per_question"] == {"a": 0.0, "b": 100.0}
    assert "1 of 2 questions have fewer than 4 answers" in caplog.text


def test_mismatched_ids_are_named():
    answers = {f"q{i}": ["yes"] for i in range(8)}
    predictions = {f"q{i}": "yes" for i in range(1, 8)} | {"extra": "no"}
    with pytest.raises(
        ValueError,
        match=r"1 id\(s\) in answers but not in predictions: 'q0'; "
        r"1 id\(s\) in predictions but not in answers: 'extra'",
    ):
        vqa_accuracy(predictions, answers)
    with pytest.raises(ValueError, match=r"8 id\(s\) in answers but not in predictions: 'q0', .*'q4', \.\.\.$"):
        vqa_accuracy({}, answers)


def test_answer_types_must_cover_the_same_ids():
    with pytest.raises(ValueError, match=r"1 id\(s\) in answers but not in answer_types: 'b'"):
        vqa_accuracy({"a": "x", "b": "y"}, {"a": ["x"], "b": ["y"]}, {"a": "other"})


@pytest.mark.parametrize(
    ("predictions", "answers", "error", "match"),
    [
        ({"a": "x"}, {"a": []}, ValueError, "at least one answer"),
        ({"a": "x"}, {"a": "x"}, TypeError, "list of answers"),
        ({"a": "x"}, {"a": ["x", None]}, TypeError, "only strings"),
        ({"a": None}, {"a": ["x"]}, TypeError, "must be a string"),
        ({}, {}, ValueError, "no questions"),
    ],
)
def test_bad_input(predictions, answers, error, match):
    with pytest.raises(error, match=match):
        vqa_accuracy(predictions, answers)


def test_exact_match_compares_with_the_majority_answer_after_normalisation():
    from vlmopt.metrics import exact_match_accuracy

    answers = {
        "gqa1": ["dog"],
        "gqa2": ["2"],
        "gqa3": ["left"],
        # VQAv2-style: "no" is the majority of ten, so "yes" (3 annotators) is not an exact match.
        "v1": ["yes"] * 3 + ["no"] * 7,
    }
    predictions = {"gqa1": "The Dog.", "gqa2": "two", "gqa3": "right", "v1": "yes"}
    result = exact_match_accuracy(predictions, answers)
    assert result["per_question"] == {"gqa1": 100.0, "gqa2": 100.0, "gqa3": 0.0, "v1": 0.0}
    assert result["overall"] == 50.0
    # Ties go to the first listed answer.
    assert exact_match_accuracy({"q": "cat"}, {"q": ["cat", "dog"]})["overall"] == 100.0
    assert exact_match_accuracy({"q": "dog"}, {"q": ["cat", "dog"]})["overall"] == 0.0
