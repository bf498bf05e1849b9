"""Real-vs-generated classification from generated text: the label-reading rule and its report.

A model finetuned on label texts ("This image is AI-generated, it is an image of ...") answers in
words, so its label has to be read from what it wrote. :func:`extract_label` does that with one
deterministic rule, documented here and tested case by case:

1. Normalise: lower case; ``a.i.`` becomes ``ai``; hyphens lose their surrounding spaces (a
   word-level tokenizer decodes ``AI-generated`` as ``ai - generated``); ``ai generated`` and
   ``computer generated`` become one hyphenated word; ``isn't`` / ``is not`` style negations
   become a separate ``not``; everything but letters, digits, hyphens and apostrophes separates words.
2. Verdict words: generated -- ``ai-generated``, ``computer-generated``, ``generated``,
   ``synthetic``, ``fake``, ``artificial``; real -- ``natural``, ``real``, ``authentic``,
   ``genuine``. A verdict word next to ``or`` ("real or AI-generated") asks a question and is
   skipped.
3. A verdict word is *stated* when one of the three words before it is a verb of being or seeming
   (``is``, ``are``, ``was``, ``be``, ``looks``, ``appears``, ``seems``): "this image is
   natural", "it looks fake". The first stated verdict decides, wherever it is in the text (the
   study this replaces read a keyword in the first 30 characters, so a verdict after a long
   caption was lost); if none is stated, the first verdict word anywhere decides ("a synthetic
   photo"), so a caption's "an image of a real dog" never overrides "... it is AI-generated".
4. ``not``, ``never`` or ``no`` among the two words before the deciding word flips it ("this
   image is not AI-generated" is real).
5. No verdict word: the label is unknown (``None``); it counts as a wrong answer in accuracy
   and is reported as ``n_unparsed``.

:func:`binary_report` scores the extracted labels: accuracy over every sample, and precision,
recall and F1 of the ``generated`` class (an unknown label is a negative prediction: it lowers
recall, never precision), all in percent, plus the confusion matrix as counts
``cm_<true>_as_<predicted>`` for true ``real`` / ``generated`` and predicted ``real`` /
``generated`` / ``unparsed``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "GENERATED",
    "GENERATED_WORDS",
    "LABEL_NAMES",
    "REAL",
    "REAL_WORDS",
    "binary_report",
    "extract_label",
    "label_texts",
]

#: Label values (and names) shared with the datasets: 0 real, 1 generated.
REAL, GENERATED = 0, 1
LABEL_NAMES = ("real", "generated")

GENERATED_WORDS = ("ai-generated", "computer-generated", "generated", "synthetic", "fake", "artificial")
REAL_WORDS = ("natural", "real", "authentic", "genuine")
_VERDICT = {**{w: GENERATED for w in GENERATED_WORDS}, **{w: REAL for w in REAL_WORDS}}
_BEING = {"is", "are", "was", "were", "be", "been", "looks", "look", "appears", "appear", "seems", "seem"}
_NEGATIONS = {"not", "never", "no"}


def _words(text: str) -> list[str]:
    text = text.lower().replace("a.i.", "ai")
    text = re.sub(r"\s*-\s*", "-", text)
    text = re.sub(r"\b(ai|computer)\s+generated\b", r"\1-generated", text)
    text = re.sub(r"n't\b", " not", text)
    return re.findall(r"[a-z0-9'-]+", text)


def extract_label(text: str | None) -> int | None:
    """The label stated by ``text``: 1 generated, 0 real, None when it states neither (module rule)."""
    if not text:
        return None
    words = _words(text)
    candidates = []
    for i, word in enumerate(words):
        if word not in _VERDICT:
            continue
        if (i > 0 and words[i - 1] == "or") or (i + 1 < len(words) and words[i + 1] == "or"):
            continue  # "real or generated": a question, not an answer
        stated = any(w in _BEING for w in words[max(0, i - 3) : i])
        candidates.append((not stated, i))
    if not candidates:
        return None
    _, i = min(candidates)
    label = _VERDICT[words[i]]
    if any(w in _NEGATIONS for w in words[max(0, i - 2) : i]):
        label = 1 - label
    return label


def label_texts(predictions: Sequence[str | None]) -> list[int | None]:
    """:func:`extract_label` of each prediction."""
    return [extract_label(p) for p in predictions]


def binary_report(true: Sequence[int], predicted: Sequence[int | None]) -> dict[str, float]:
    """Accuracy, precision / recall / F1 of ``generated`` (percent), unparsed count and confusion counts."""
    if len(true) != len(predicted):
        raise ValueError(f"{len(true)} true labels but {len(predicted)} predictions")
    if not len(true):
        raise ValueError("no samples to score")
    bad = sorted({t for t in true if t not in (REAL, GENERATED)})
    if bad:
        raise ValueError(f"true labels must be 0 (real) or 1 (generated), got {bad}")
    out: dict[str, float] = {}
    for t, t_name in enumerate(LABEL_NAMES):
        for p, p_name in ((REAL, "real"), (GENERATED, "generated"), (None, "unparsed")):
            out[f"cm_{t_name}_as_{p_name}"] = float(
                sum(1 for y, q in zip(true, predicted, strict=True) if y == t and q == p)
            )
    tp = out["cm_generated_as_generated"]
    fp = out["cm_real_as_generated"]
    positives = tp + out["cm_generated_as_real"] + out["cm_generated_as_unparsed"]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / positives if positives else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    correct = out["cm_real_as_real"] + tp
    return {
        "accuracy": 100.0 * correct / len(true),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "n_unparsed": float(sum(1 for q in predicted if q is None)),
        **out,
    }
