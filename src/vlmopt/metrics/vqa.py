"""VQA accuracy exactly as the official VQA evaluation computes and reports it.

Reproduces ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of https://github.com/GT-Vision-Lab/VQA
(master, commit a013f00; Antol et al., "VQA: Visual Question Answering", https://arxiv.org/abs/1505.00468;
Goyal et al., VQA v2, https://arxiv.org/abs/1612.00837). A predicted answer scores, for each of the
leave-one-out subsets of the human answers, ``min(1, matches / 3)``, and the question's accuracy is the mean
over those subsets. Answers are normalised (punctuation, number words, articles, contractions) only when the
human answers of a question are not all identical, as in the official code; overall and per-answer-type
accuracies are percentages rounded to two decimals the way it rounds them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["check_ids", "exact_match_accuracy", "normalize_answer", "question_accuracy", "vqa_accuracy"]

log = logging.getLogger(__name__)

# fmt: off
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
# fmt: on

# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a look-ahead for the text "<=" and a
# digit (meant as a look-behind), which never matches before a ".", so it removes every "." not followed by
# a digit. It passes re.UNICODE (= 32) where re.sub takes ``count``, so at most 32 periods are removed.
_PERIOD = re.compile(r"\.(?!\d)")
_MAX_PERIODS_REMOVED = 32  # re.UNICODE
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")


def check_ids(given: Mapping[str, object], expected: Mapping[str, object], given_name: str, expected_name: str) -> None:
    """Raise ValueError, naming a few of the offending ids, unless both mappings have the same keys."""
    parts = []
    for a, a_name, b, b_name in (
        (expected, expected_name, given, given_name),
        (given, given_name, expected, expected_name),
    ):
        ids = sorted(set(a) - set(b), key=str)
        if ids:
            shown = ", ".join(repr(i) for i in ids[:5]) + (", ..." if len(ids) > 5 else "")
            parts.append(f"{len(ids)} id(s) in {a_name} but not in {b_name}: {shown}")
    if parts:
        raise ValueError(f"{given_name} and {expected_name} must have the same sample ids; " + "; ".join(parts))


def _strip_punctuation(text: str) -> str:
    """The official processPunctuation: each mark is deleted or replaced by a space, then periods go."""
    # Whether a mark is deleted depends on the original text, for every mark alike.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS_REMOVED)


def _normalize_words(text: str) -> str:
    """The official processDigitArticle: lower-case, number words to digits, no articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Full official normalisation of one answer (applied only where the human answers disagree)."""
    return _normalize_words(_strip_punctuation(_clean_whitespace(text)))


def question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy (0..1) of one predicted answer against a question's human answers, as the official code.

    Newlines and tabs become spaces and ends are stripped; full normalisation is applied to the prediction
    and the answers only if the answers are not all identical (the official rule, meant to leave OCR-like
    answers untouched), so with unanimous answers the match is exact and case-sensitive. The result is the
    mean over the len(answers) leave-one-out subsets of min(1, matching answers in the subset / 3); with
    fewer than 4 answers it cannot reach 1, and with one answer it is always 0.
    """
    gts = [_clean_whitespace(a) for a in answers]
    pred = _clean_whitespace(prediction)
    if len(set(gts)) > 1:
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    matches = [a == pred for a in gts]
    n_match = sum(matches)
    # Summed in answer order, as the official code sums its list, so floats agree to the last bit.
    subset_accs = [min(1, float(n_match - m) / 3) for m in matches]
    return float(sum(subset_accs)) / len(subset_accs)


def _percent(values: list[float], ndigits: int) -> float:
    # Same expression as the official setAccuracy: 100 * sum first, then divide, then round.
    return round(100 * float(sum(values)) / len(values), ndigits)


def vqa_accuracy(
    predictions: dict[str, str],
    answers: dict[str, list[str]],
    answer_types: dict[str, str] | None = None,
) -> dict[str, Any]:
    """VQA accuracy of predicted answers, in percent, as the official evaluation reports it.

    ``answers`` maps each question id to its human answers (10 in VQAv2; any number >= 1 works, following
    the same leave-one-out rule), ``answer_types`` optionally maps ids to "yes/no", "number", "other", ...
    Returns ``overall`` and ``per_answer_type`` (rounded to 2 decimals like the official code),
    ``per_question`` (unrounded percent, in the order of ``answers``, for later aggregation) and
    ``n_questions``.
    """
    check_ids(predictions, answers, "predictions", "answers")
    if answer_types is not None:
        check_ids(answer_types, answers, "answer_types", "answers")
    if not answers:
        raise ValueError("no questions to score")

    per_question_acc: dict[str, float] = {}
    by_type: dict[str, list[float]] = {}
    n_short = 0
    for qid, gt in answers.items():
        if isinstance(gt, str):
            raise TypeError(f"answers[{qid!r}] must be a list of answers, not a string")
        gt = list(gt)
        if not gt:
            raise ValueError(f"answers[{qid!r}] is empty: every question needs at least one answer")
        if not all(isinstance(a, str) for a in gt):
            raise TypeError(f"answers[{qid!r}] must contain only strings")
        if not isinstance(predictions[qid], str):
            raise TypeError(f"predictions[{qid!r}] must be a string, got {type(predictions[qid]).__name__}")
        n_short += len(gt) < 4
        acc = question_accuracy(predictions[qid], gt)
        per_question_acc[qid] = acc
        if answer_types is not None:
            by_type.setdefault(answer_types[qid], []).append(acc)
    if n_short:
        log.warning(
            "%d of %d questions have fewer than 4 answers: under the leave-one-out rule their accuracy "
            "cannot reach 100%% (a single answer always scores 0)",
            n_short,
            len(answers),
        )

    return {
        "overall": _percent(list(per_question_acc.values()), 2),
        "per_answer_type": {t: _percent(accs, 2) for t, accs in by_type.items()},
        "per_question": {qid: 100 * acc for qid, acc in per_question_acc.items()},
        "n_questions": len(per_question_acc),
    }


def exact_match_accuracy(predictions: dict[str, str], answers: dict[str, list[str]]) -> dict[str, Any]:
    """Share of predictions (percent) equal to the question's answer after the official normalisation.

    The answer is the most frequent of the human answers (ties: the first listed), so for
    single-answer datasets (GQA, whose evaluation compares after removing punctuation and articles
    and mapping number words to digits) it is that answer. Both sides are fully normalised, always.
    Returns ``overall`` (rounded to 2 decimals), ``per_question`` (0 or 100) and ``n_questions``.
    """
    check_ids(predictions, answers, "predictions", "answers")
    if not answers:
        raise ValueError("no questions to score")
    per_question = {}
    for qid, gt in answers.items():
        gt = list(gt)
        if not gt:
            raise ValueError(f"answers[{qid!r}] is empty: every question needs at least one answer")
        counts: dict[str, int] = {}
        for answer in gt:
            counts[answer] = counts.get(answer, 0) + 1
        majority = max(counts, key=lambda a: (counts[a], -gt.index(a)))
        same = normalize_answer(predictions[qid]) == normalize_answer(majority)
        per_question[qid] = 100.0 if same else 0.0
    return {
        "overall": round(sum(per_question.values()) / len(per_question), 2),
        "per_question": per_question,
        "n_questions": len(per_question),
    }
