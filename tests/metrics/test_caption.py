"""Caption metrics against numbers produced by pycocoevalcap's own COCOEvalCap.

METEOR starts a JVM (about 10 s), so the fixture is scored once per module and checked by many tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmopt.metrics import CAPTION_METRICS, caption_scores, caption_scores_per_sample, evaluate_captions
from vlmopt.metrics import caption as caption_module

FIXTURES = Path(__file__).parent / "fixtures"

# Produced by pycocoevalcap 1.2's COCOEvalCap (pycocoevalcap.eval.COCOEvalCap(coco, cocoRes).eval) on
# fixtures/captions.json, with pycocotools COCO objects built from it, SPICE left out, Java 17.
# fixtures/captions_expected.json holds that run's per-image values (COCOEvalCap.imgToEval).
OFFICIAL_CORPUS = {
    "Bleu_1": 0.734616203209553,
    "Bleu_2": 0.6305158562369086,
    "Bleu_3": 0.5433368109200444,
    "Bleu_4": 0.47783676548626186,
    "METEOR": 0.3517290820990762,
    "ROUGE_L": 0.6176752300062728,
    "CIDEr": 2.138955890005509,
}


@pytest.fixture(scope="module")
def fixture() -> dict:
    return json.loads((FIXTURES / "captions.json").read_text())


@pytest.fixture(scope="module")
def evaluation(fixture):
    return evaluate_captions(fixture["predictions"], fixture["references"])


def test_corpus_scores_match_cocoevalcap(evaluation):
    assert list(evaluation.corpus) == list(CAPTION_METRICS)
    assert all(type(v) is float for v in evaluation.corpus.values())
    assert evaluation.corpus == pytest.approx(OFFICIAL_CORPUS, abs=1e-9)


def test_per_sample_scores_match_cocoevalcap(evaluation, fixture):
    expected = json.loads((FIXTURES / "captions_expected.json").read_text())["per_sample"]
    assert list(evaluation.per_sample) == list(fixture["references"])
    for sample_id, scores in expected.items():
        assert evaluation.per_sample[sample_id] == pytest.approx(scores, abs=1e-9), sample_id


def test_predictions_are_not_used_as_references(evaluation):
    # Scoring predictions against themselves gave METEOR = 1.0 in the scripts this module replaces.
    assert 0.2 < evaluation.corpus["METEOR"] < 0.5
    meteor = [s["METEOR"] for s in evaluation.per_sample.values()]
    assert len(set(meteor)) >= 12
    assert evaluation.per_sample["unrelated"]["METEOR"] < 0.2
    assert evaluation.per_sample["giraffe"]["METEOR"] < 1.0


def test_exact_copy_of_a_reference_scores_one(evaluation):
    copy = evaluation.per_sample["surf"]  # the prediction is one of its references, up to case
    assert [copy[f"Bleu_{n}"] for n in (1, 2, 3, 4)] == pytest.approx([1.0] * 4)
    assert copy["ROUGE_L"] == pytest.approx(1.0)


def test_empty_and_punctuation_only_predictions_score_zero(evaluation):
    for sample_id in ("empty", "punct-only"):
        assert set(evaluation.per_sample[sample_id].values()) == {0.0}


def test_public_wrappers(monkeypatch, evaluation):
    calls = []

    def fake(predictions, references):
        calls.append((predictions, references))
        return evaluation

    monkeypatch.setattr(caption_module, "evaluate_captions", fake)
    assert caption_scores({"a": "x"}, {"a": ["x"]}) is evaluation.corpus
    assert caption_scores_per_sample({"a": "x"}, {"a": ["x"]}) is evaluation.per_sample
    assert len(calls) == 2


def test_tokenizer_keeps_captions_aligned_across_line_breaks():
    # A "\r" or U+2028 would start a new line in the Java tokenizer and shift later captions.
    tokenized = caption_module._ptb_tokenize({"a": ["One\rtwo, three.", "four\u2028five"], "b": ["", "Hello (World)!"]})
    # Brackets survive as "-lrb-"/"-rrb-": pycocoevalcap's filter lists them upper-case, after -lowerCase.
    assert tokenized == {"a": ["one two three", "four five"], "b": ["", "hello -lrb- world -rrb-"]}


def test_mismatched_ids_are_named():
    references = {f"img{i}": ["a caption"] for i in range(7)}
    predictions = {f"img{i}": "a caption" for i in range(2, 7)} | {"other": "x"}
    with pytest.raises(
        ValueError,
        match=r"2 id\(s\) in references but not in predictions: 'img0', 'img1'; "
        r"1 id\(s\) in predictions but not in references: 'other'",
    ):
        evaluate_captions(predictions, references)


@pytest.mark.parametrize(
    ("predictions", "references", "error", "match"),
    [
        ({"a": "x"}, {"a": []}, ValueError, "at least one reference"),
        ({"a": "x"}, {"a": "x y"}, TypeError, "list of captions"),
        ({"a": "x"}, {"a": ["x", 3]}, TypeError, "only strings"),
        ({"a": None}, {"a": ["x"]}, TypeError, "must be a string"),
    ],
)
def test_bad_input(predictions, references, error, match):
    with pytest.raises(error, match=match):
        evaluate_captions(predictions, references)


def test_missing_java_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="'java'"):
        caption_scores({"a": "a dog"}, {"a": ["a dog runs"]})
