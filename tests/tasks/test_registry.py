"""The task registry: what each task declares, and the hooks figures and scoring use."""

from __future__ import annotations

import pandas as pd
import pytest

from vlmopt.tasks import GENERATIVE_TASKS, TASKS, get_task, majority_answer


def test_every_task_declares_what_the_pipeline_asks():
    for name, task in TASKS.items():
        assert task.name == name
        assert task.kind in ("generate", "similarity")
        assert task.columns, name
        assert task.headline in task.metrics, name
        assert task.headline_label, name
        # Tasks with answers to show say which columns hold the truth; judged ones say how.
        assert bool(task.truth_columns) == task.generative, name
    assert GENERATIVE_TASKS == ("captioning", "vqa", "real_vs_generated")


def test_an_unknown_task_is_named():
    with pytest.raises(ValueError, match=r"unknown task 'ocr'; known tasks: \['captioning', 'classification'"):
        get_task("ocr")


def test_majority_answer_ties_go_to_the_first_listed():
    assert majority_answer(["no", "yes", "yes", "no"]) == "no"
    assert majority_answer(["a", "b", "b"]) == "b"
    assert majority_answer([]) == ""


def test_answer_keys_and_judgements_follow_the_scoring():
    vqa, rvg, cap = get_task("vqa"), get_task("real_vs_generated"), get_task("captioning")
    # VQA normalisation: number words become digits, articles and punctuation go.
    assert vqa.answer_key("Two.") == vqa.answer_key("2")
    assert vqa.judge("two", pd.Series({"answers": ["2", "2", "3"]})) is True
    assert vqa.judge("3", pd.Series({"answers": ["2", "2", "3"]})) is False
    assert rvg.answer_key("This image is AI-generated.") == "generated"
    assert rvg.answer_key("a cat on a mat") == "unparsed"
    assert rvg.judge("It is a real photo.", pd.Series({"label_name": "real"})) is True
    assert cap.judge("a cat", pd.Series({"references": ["a cat"]})) is None
    assert cap.answer_key("A  Cat.") == cap.answer_key("a cat")


def test_scoring_refuses_predictions_of_other_samples():
    table = pd.DataFrame({"sample_id": ["a", "b"], "references": [["x y z w"], ["x y z w"]]})
    preds = pd.DataFrame({"sample_id": ["a", "c"], "prediction": ["x", "y"], "error": [None, None]})
    with pytest.raises(ValueError, match="do not cover exactly the samples of test.parquet"):
        get_task("captioning").score(preds, table, source="test.parquet")


def test_similarity_tasks_name_their_prediction_settings():
    inference = {"retrieval_k": 16}
    assert get_task("retrieval").inference_settings({}, inference) == {"k": 16}
    assert get_task("classification").inference_settings({}, inference) == {"templates": ["a photo of a {}."]}
    assert get_task("classification").inference_settings({"templates": ["{}"]}, inference) == {"templates": ["{}"]}
    assert get_task("vqa").inference_settings({}, inference) == {}
