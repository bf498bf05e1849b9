"""A VQA table with options (ScienceQA) is also scored by multiple-choice accuracy."""

import pandas as pd
import pytest

from vlmopt.data import write_table
from vlmopt.pipeline import score_predictions
from vlmopt.tables import write_predictions


def test_vqa_scores_add_multiple_choice_accuracy(tmp_path):
    table = pd.DataFrame(
        {
            "sample_id": ["q1", "q2", "q3", "q4"],
            "image": [f"images/test/{i}.png" for i in range(4)],
            "question": ["Which is a mammal?\nA. cat\nB. trout", "Q?\nA. yes\nB. no", "Q?\nA. red\nB. blue", "Q?"],
            "answers": [["cat"], ["no"], ["blue"], ["up"]],
            "answer_type": ["natural science", "natural science", "language science", "language science"],
            "choices": [["cat", "trout"], ["yes", "no"], ["red", "blue"], ["up", "down", "left"]],
            "answer_index": [0, 1, 1, 0],
        }
    )
    write_table(table, tmp_path / "test.parquet", tasks=["vqa"])
    # By letter (right), by text (right), a wrong letter, and no option at all (unparsed, wrong).
    preds = pd.DataFrame({"sample_id": table["sample_id"], "prediction": ["A", "no", "A.", "maybe"], "error": None})
    write_predictions(preds, tmp_path / "p.parquet", {"task": "vqa"})
    keys = {"model": "m", "ft": "none", "variant": "baseline", "task": "vqa", "dataset": "scienceqa"}
    metrics = score_predictions(
        tmp_path / "p.parquet", tmp_path / "test.parquet", tmp_path / "s.parquet", keys=keys, settings={}
    )
    assert metrics["mc_accuracy"] == pytest.approx(50.0)
    assert metrics["mc_accuracy/natural science"] == pytest.approx(100.0)
    assert metrics["mc_accuracy/language science"] == pytest.approx(0.0)
    assert metrics["mc_unparsed"] == 1
    # Exact match compares the text with the answer: only "no" matches.
    assert metrics["exact_match"] == pytest.approx(25.0)
