"""Multiple-choice accuracy (ScienceQA and the like): which option a free-text answer picks, and how often it is right.

A question offers its choices lettered ``A``, ``B``, ... (see :mod:`vlmopt.data.scienceqa`), and
a model answers in free text. :func:`choice_index` maps the answer to an option by one
deterministic rule, tried in order; the first step that decides wins:

1. The ends are stripped, and for the letter step a line break reads as ``". "`` (as in LLaVA's
   evaluation, so ``B`` on a line of its own counts as ``B.``).
2. **Letter.** The answer *is* a letter of a valid option (one of the first ``len(choices)``
   capital letters), alone or written ``A.``, ``A)``, ``A:``, ``A,``, ``(A)`` or ``(A).``, or
   begins with one of the punctuated forms and a space (``A. the moon``, ``(B) water``); or it
   contains ``The answer is`` / ``Answer:`` followed by such a letter (``The answer is C.``,
   ``Answer: (B)``). Letters are capitals only, so an article (``a cat``) is never read as option
   A, and neither is a bare capital followed by a word (``A cat``). A letter past the last option
   does not decide.
3. **Text equal.** The answer equals exactly one choice's text once both are lower-cased, their
   whitespace collapsed and final punctuation (``.!?,;:``) and surrounding quotes removed.
4. **Text contained.** Exactly one choice's normalised text occurs in the normalised answer as
   whole words.
5. Otherwise the answer is *unparsed*: ``None``, scored as wrong.

This follows LLaVA's ScienceQA evaluation (https://github.com/haotian-liu/LLaVA,
``llava/eval/eval_science_qa.py``: the bare option letter, ``"A. "`` at the start, and ``The answer
is A``), which the official ScienceQA code resembles (lupantech/ScienceQA,
``models/run_gpt3.py``: ``The answer is A.``). When nothing matches, the official code picks a
*random* option and LLaVA scores the answer wrong; here an unparsed answer is always wrong, never
a guess, so scores are reproducible. Steps 3-4 add credit for answers that name the option's
text instead of its letter (small models often do).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from vlmopt.metrics.vqa import check_ids

__all__ = ["OPTION_LETTERS", "choice_index", "multiple_choice_accuracy", "normalize_choice"]

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# "(A)" (optionally followed by . , or :) or "A" followed by one of . ) : , -- either then a space or the
# end -- or "A" at the very end.
_LETTER = r"(?:(?:\(([A-Z])\)[.,:]?|([A-Z])[.):,])(?=\s|$)|([A-Z])$)"
_LEADING = re.compile(r"^" + _LETTER)
_ANSWER_IS = re.compile(r"(?:\b[Tt]he answer is|\b[Aa]nswer:)\s*" + _LETTER)
_FINAL_PUNCTUATION = ".!?,;:"
_QUOTES = "\"'`“”‘’"


def normalize_choice(text: str) -> str:
    """Lower-cased text with collapsed whitespace, without final punctuation or surrounding quotes."""
    text = " ".join(str(text).split()).lower()
    previous = None
    while previous != text:
        previous = text
        text = text.rstrip(_FINAL_PUNCTUATION).strip().strip(_QUOTES).strip()
    return text


def _letter(match: re.Match[str] | None, n_choices: int) -> int | None:
    if match is None:
        return None
    index = OPTION_LETTERS.index(match.group(1) or match.group(2) or match.group(3))
    return index if index < n_choices else None


def choice_index(prediction: str, choices: Sequence[str]) -> int | None:
    """The index of the option ``prediction`` picks among ``choices``, or ``None`` (see the module docs)."""
    if not isinstance(prediction, str):
        raise TypeError(f"a prediction must be a string, got {type(prediction).__name__}")
    choices = list(choices)
    if not choices:
        raise ValueError("a multiple-choice question needs at least one choice")
    if len(choices) > len(OPTION_LETTERS):
        raise ValueError(f"{len(choices)} choices; at most {len(OPTION_LETTERS)} can be lettered")
    # As LLaVA's evaluation does, a line break ends a sentence: "B\nBecause ..." reads "B. Because ...".
    text = prediction.strip().replace("\n", ". ")

    index = _letter(_LEADING.search(text), len(choices))
    if index is None:
        index = _letter(_ANSWER_IS.search(text), len(choices))
    if index is not None:
        return index

    said = normalize_choice(prediction)
    if not said:
        return None
    options = [normalize_choice(c) for c in choices]
    equal = [i for i, option in enumerate(options) if option and option == said]
    if len(equal) == 1:
        return equal[0]
    if equal:
        return None
    inside = [
        i
        for i, option in enumerate(options)
        if option and re.search(r"(?<!\w)" + re.escape(option) + r"(?!\w)", said) is not None
    ]
    return inside[0] if len(inside) == 1 else None


def multiple_choice_accuracy(
    predictions: Mapping[str, str],
    choices: Mapping[str, Sequence[str]],
    answer_index: Mapping[str, int],
    answer_types: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Share of questions (percent) whose predicted answer picks the correct option.

    ``predictions`` maps each question id to the model's text, ``choices`` to its options and
    ``answer_index`` to the correct option's position; ``answer_types`` optionally groups
    questions (ScienceQA's subject). Returns ``overall`` and ``per_answer_type`` (percent rounded
    to 2 decimals), ``per_sample`` (100.0 right, 0.0 wrong, in the order of ``answer_index``),
    ``predicted_index`` (the option picked, ``None`` when unparsed), ``n_unparsed`` (answers that
    picked no option; they count as wrong) and ``n_questions``.
    """
    check_ids(predictions, answer_index, "predictions", "answer_index")
    check_ids(choices, answer_index, "choices", "answer_index")
    if answer_types is not None:
        check_ids(answer_types, answer_index, "answer_types", "answer_index")
    if not answer_index:
        raise ValueError("no questions to score")

    per_sample: dict[str, float] = {}
    predicted: dict[str, int | None] = {}
    by_type: dict[str, list[float]] = {}
    for qid, correct in answer_index.items():
        options = list(choices[qid])
        if isinstance(choices[qid], str):
            raise TypeError(f"choices[{qid!r}] must be a list of options, not a string")
        if isinstance(correct, bool) or not 0 <= int(correct) < len(options):
            raise ValueError(
                f"answer_index[{qid!r}] = {correct!r} is not the index of one of its {len(options)} choices"
            )
        picked = choice_index(predictions[qid], options)
        predicted[qid] = picked
        per_sample[qid] = 100.0 if picked == int(correct) else 0.0
        if answer_types is not None:
            by_type.setdefault(answer_types[qid], []).append(per_sample[qid])

    return {
        "overall": round(sum(per_sample.values()) / len(per_sample), 2),
        "per_answer_type": {t: round(sum(v) / len(v), 2) for t, v in by_type.items()},
        "per_sample": per_sample,
        "predicted_index": predicted,
        "n_unparsed": sum(p is None for p in predicted.values()),
        "n_questions": len(per_sample),
    }
