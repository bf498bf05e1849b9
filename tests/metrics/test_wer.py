"""WER against worked examples, and prompt stripping."""

from __future__ import annotations

import pytest

from vlmopt.metrics import strip_prompt, word_error_rate


def test_corpus_wer_counts_every_edit_over_all_reference_words():
    # "sat" -> "sit" (1 substitution); "barks" inserted (1 insertion); 5 reference words.
    result = word_error_rate({"a": "The cat sit.", "b": "a dog barks"}, {"a": "the cat sat", "b": "A dog"})
    assert result["wer"] == pytest.approx(40.0)
    assert (result["substitutions"], result["insertions"], result["deletions"]) == (1, 1, 0)
    # More inserted words than reference words: above 100 %.
    assert word_error_rate({"a": "no no no no"}, {"a": "yes"})["wer"] == pytest.approx(400.0)


def test_a_repeated_prompt_is_stripped_before_scoring():
    prompt = "Question: what is shown? Answer:"
    assert strip_prompt("question: What is shown?  answer: a red bus", prompt) == "a red bus"
    assert strip_prompt("a red bus", prompt) == "a red bus"
    assert strip_prompt("Question: what is it", prompt) == "Question: what is it"  # not the whole prompt
    leaked = {"q": "Question: what is shown? Answer: red bus"}
    assert word_error_rate(leaked, {"q": "red bus"}, {"q": prompt})["wer"] == 0.0
    assert word_error_rate(leaked, {"q": "red bus"})["wer"] == pytest.approx(250.0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="same ids"):
        word_error_rate({"a": "x"}, {"b": "x"})
    with pytest.raises(ValueError, match="no words"):
        word_error_rate({"a": "x"}, {"a": "?!"})
