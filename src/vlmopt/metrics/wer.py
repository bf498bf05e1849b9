"""Word error rate of generated answers against reference answers, with jiwer (https://github.com/jitsi/jiwer).

Both sides are lower-cased, stripped of punctuation and of repeated spaces before words are
compared. The rate is corpus-level, as jiwer reports it: substitutions + deletions + insertions
over all reference words, in percent (it exceeds 100 when a model adds more words than the
references hold). A generated text that repeats its prompt (a decoder whose output was not cut
after the prompt, the bug that gave one of the seed studies WER above 100 %) is scored after
:func:`strip_prompt` removes it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["strip_prompt", "word_error_rate"]


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def strip_prompt(text: str, prompt: str) -> str:
    """``text`` without a leading copy of ``prompt`` (compared case-, space- and punctuation-blind)."""
    if not prompt.strip():
        return text
    words, prompt_words = text.split(), _normal(prompt).split()
    taken, consumed = 0, 0
    for i, word in enumerate(words):
        pieces = _normal(word).split()
        if prompt_words[taken : taken + len(pieces)] != pieces:
            return text
        taken += len(pieces)
        if taken == len(prompt_words):
            consumed = i + 1
            break
    return " ".join(words[consumed:]) if consumed else text


def word_error_rate(
    predictions: Mapping[str, str], references: Mapping[str, str], prompts: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Corpus WER (percent) of ``predictions`` against one reference each; ``prompts`` are stripped first."""
    import jiwer

    if set(predictions) != set(references):
        raise ValueError("predictions and references must have the same ids")
    if not references:
        raise ValueError("no answers to score")
    ids = list(references)
    refs = [_normal(references[i]) for i in ids]
    empty = [i for i, r in zip(ids, refs, strict=True) if not r]
    if empty:
        raise ValueError(f"{len(empty)} references have no words, e.g. {empty[:3]}")
    hyps = [_normal(strip_prompt(predictions[i], prompts[i]) if prompts else predictions[i]) for i in ids]
    out = jiwer.process_words(refs, hyps)
    return {
        "wer": 100.0 * out.wer,
        "substitutions": out.substitutions,
        "deletions": out.deletions,
        "insertions": out.insertions,
        "n_reference_words": sum(len(r.split()) for r in refs),
    }
