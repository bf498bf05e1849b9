"""Multiple-choice accuracy: worked examples for each step of the rule that maps an answer to an option."""

from __future__ import annotations

import pytest

from vlmopt.metrics import choice_index, multiple_choice_accuracy
from vlmopt.metrics.multiple_choice import normalize_choice

CHOICES = ["a cat", "a dog", "the moon"]


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        # Letter: alone, punctuated, in parentheses, leading a sentence, or after "The answer is" / "Answer:".
        ("A", 0),
        ("  B  ", 1),
        ("C.", 2),
        ("B)", 1),
        ("(C)", 2),
        ("A:", 0),
        ("C. the moon", 2),
        ("(B) a dog", 1),
        ("B, because dogs bark.", 1),
        ("B\nBecause dogs bark.", 1),  # a line break reads as ". " (LLaVA)
        ("The answer is C.", 2),
        ("I looked closely. The answer is B", 1),
        ("the answer is (A).", 0),
        ("Answer: B", 1),
        # The letter decides even when the text names another option.
        ("A. the moon", 0),
        # Text equal to one option (case, whitespace, final punctuation, quotes normalised).
        ("The Moon!", 2),
        ("  a   DOG. ", 1),
        ('"a cat"', 0),
        ("A dog", 1),  # a capital followed by a word is an article, not a letter
        # Text of exactly one option inside the answer, as whole words.
        ("I think it is the moon, clearly", 2),
        ("The answer is A dog", 1),
    ],
)
def test_each_rule_step_picks_the_option(prediction, expected):
    assert choice_index(prediction, CHOICES) == expected


@pytest.mark.parametrize(
    "prediction",
    [
        "",
        "   ",
        "D",  # a letter past the last option
        "E.",
        "The answer is D.",
        "a",  # lower-case letters are not option letters
        "cat",  # not a whole option
        "a cat or a dog",  # two options named
        "I do not know",
    ],
)
def test_unparseable_answers_pick_nothing(prediction):
    assert choice_index(prediction, CHOICES) is None


def test_options_are_matched_as_whole_words_and_ties_pick_nothing():
    assert choice_index("I know", ["yes", "no"]) is None  # "no" inside "know" does not count
    assert choice_index("no", ["yes", "no"]) == 1
    assert choice_index("Salt", ["Salt", "salt"]) is None  # equal to two options
    assert choice_index("it is ice cream", ["ice", "ice cream"]) is None  # both occur


def test_normalize_choice():
    assert normalize_choice('  "The  Moon."  ') == "the moon"
    assert normalize_choice("Yes!?") == "yes"


def test_choice_index_rejects_bad_inputs():
    with pytest.raises(TypeError, match="a prediction must be a string"):
        choice_index(None, CHOICES)
    with pytest.raises(ValueError, match="at least one choice"):
        choice_index("A", [])


def test_multiple_choice_accuracy_counts_unparsed_answers_as_wrong():
    predictions = {"q1": "A", "q2": "The answer is B.", "q3": "the moon", "q4": "no idea", "q5": "B"}
    choices = {q: CHOICES for q in predictions}
    answer_index = {"q1": 0, "q2": 1, "q3": 0, "q4": 2, "q5": 2}
    types = {
        "q1": "natural science",
        "q2": "natural science",
        "q3": "social science",
        "q4": "social science",
        "q5": "x",
    }
    result = multiple_choice_accuracy(predictions, choices, answer_index, answer_types=types)
    assert result["per_sample"] == {"q1": 100.0, "q2": 100.0, "q3": 0.0, "q4": 0.0, "q5": 0.0}
    assert result["predicted_index"] == {"q1": 0, "q2": 1, "q3": 2, "q4": None, "q5": 1}
    assert result["overall"] == 40.0
    assert result["n_unparsed"] == 1
    assert result["n_questions"] == 5
    assert result["per_answer_type"] == {"natural science": 100.0, "social science": 0.0, "x": 0.0}
    assert multiple_choice_accuracy({"q": "C"}, {"q": ["x", "y", "z"]}, {"q": 2})["overall"] == 100.0
    # Two of three right: rounded to two decimals.
    three = multiple_choice_accuracy(
        {"a": "A", "b": "A", "c": "B"}, {k: ["x", "y"] for k in "abc"}, {"a": 0, "b": 0, "c": 0}
    )
    assert three["overall"] == 66.67 and three["per_answer_type"] == {}


def test_multiple_choice_accuracy_checks_its_inputs():
    with pytest.raises(ValueError, match=r"1 id\(s\) in answer_index but not in predictions: 'q2'"):
        multiple_choice_accuracy({"q1": "A"}, {"q1": ["x"], "q2": ["y"]}, {"q1": 0, "q2": 0})
    with pytest.raises(ValueError, match=r"answer_index\['q'\] = 3 is not the index of one of its 2 choices"):
        multiple_choice_accuracy({"q": "A"}, {"q": ["x", "y"]}, {"q": 3})
    with pytest.raises(TypeError, match=r"choices\['q'\] must be a list of options"):
        multiple_choice_accuracy({"q": "A"}, {"q": "xy"}, {"q": 0})
    with pytest.raises(ValueError, match="no questions to score"):
        multiple_choice_accuracy({}, {}, {})
