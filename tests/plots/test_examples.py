"""The before/after grid of sample predictions: what is picked, and what is drawn under each image."""

from __future__ import annotations

import itertools
import logging

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from PIL import Image

from vlmopt.plots import examples
from vlmopt.plots.examples import before_after, example_figure, pick_examples, pick_samples
from vlmopt.plots.style import method_colour, plt

IDS = [f"d-test-{i:05d}" for i in range(5)]
METHODS = {"baseline": "none", "awq-w4": "awq", "prune-2": "prune_layers"}


def _summary_row(model: str, ft: str, variant: str, task: str, dataset: str, **metrics: float) -> dict:
    return {"model": model, "ft": ft, "variant": variant, "task": task, "dataset": dataset, **metrics}


def _dataset(root, name: str = "d") -> pd.DataFrame:
    """Five small PNGs and a test split with the columns of every generative task."""
    folder = root / name
    (folder / "images" / "test").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for sid in IDS:
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype("uint8")).save(folder / "images" / "test" / f"{sid}.png")
    test = pd.DataFrame(
        {
            "sample_id": IDS[::-1],  # stored out of order: the figure sorts by sample id
            "image": [f"images/test/{sid}.png" for sid in IDS[::-1]],
            "references": [[f"reference {i} of {sid}", "another reference"] for i, sid in enumerate(IDS[::-1])],
            "question": [f"how many shapes in {sid}?" for sid in IDS[::-1]],
            "answers": [["2"] * 6 + ["3"] * 4] * 5,
            "label_name": ["real", "generated", "real", "generated", "real"],
        }
    )
    test.to_parquet(folder / "test.parquet")
    return test


def _predictions(texts: dict[str, str | None], errors: dict[str, str] | None = None) -> pd.DataFrame:
    """Predictions of the ids in ``texts`` (a None text: the sample is missing from the file)."""
    ids = [sid for sid in IDS if texts.get(sid) is not None]
    errors = errors or {}
    return pd.DataFrame(
        {
            "sample_id": ids,
            "prediction": [texts[sid] for sid in ids],
            "error": [errors.get(sid) for sid in ids],
        }
    )


def _caption_predictions() -> dict[str, pd.DataFrame]:
    same = {sid: f"a caption of {sid}" for sid in IDS}
    return {
        "baseline": _predictions(same),
        # Differs from the baseline only in case, spacing and the full stop: the same answer.
        "awq-w4": _predictions({**same, IDS[0]: f"A  caption of {IDS[0]}.", IDS[3]: "something else"}),
        # Missing IDS[1]; IDS[4] failed.
        "prune-2": _predictions({**same, IDS[1]: None}, errors={IDS[4]: "out of memory"}),
    }


def _texts(fig: plt.Figure) -> list[tuple[str, str]]:
    """(text, colour) of every text drawn, lines joined by spaces."""
    found = [t for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_color")) if t.get_text()]
    return [(t.get_text().replace("\n", " "), to_hex(t.get_color())) for t in found]


def _assert_no_overlap(fig: plt.Figure) -> None:
    renderer = fig.canvas.get_renderer()
    boxes = [
        (t.get_text(), t.get_window_extent(renderer))
        for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_window_extent"))
        if t.get_text() and t.get_visible()
    ]
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        width = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
        height = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
        assert width <= 0.5 or height <= 0.5, f"{a!r} overlaps {b!r}"
    fig_box = fig.bbox
    for text, box in boxes:
        assert box.x0 >= fig_box.x0 - 0.5 and box.x1 <= fig_box.x1 + 0.5, f"{text!r} is cut off"
        assert box.y0 >= fig_box.y0 - 0.5 and box.y1 <= fig_box.y1 + 0.5, f"{text!r} is cut off"


def test_pick_examples_takes_the_richest_configuration_and_its_baseline_best_and_worst():
    rows = [
        # captioning on d: m1/full has four variants, m0/none only its baseline.
        _summary_row("m0", "none", "baseline", "captioning", "d", CIDEr=0.1),
        _summary_row("m1", "full", "baseline", "captioning", "d", CIDEr=1.2),
        _summary_row("m1", "full", "awq-w4", "captioning", "d", CIDEr=1.0),
        _summary_row("m1", "full", "gptq-w4", "captioning", "d", CIDEr=1.5),
        _summary_row("m1", "full", "prune-2", "captioning", "d", CIDEr=0.2),
        # captioning on e: a tie of two variants each, the first in sorted order wins (m1/full < m2/none).
        _summary_row("m2", "none", "baseline", "captioning", "e", CIDEr=1.0),
        _summary_row("m2", "none", "bf16", "captioning", "e", CIDEr=1.0),
        _summary_row("m1", "full", "baseline", "captioning", "e", CIDEr=1.0),
        _summary_row("m1", "full", "bf16", "captioning", "e", CIDEr=0.9),
        # vqa without a baseline; two variants tie for best: the first in sorted order is the best.
        _summary_row("m1", "full", "w4", "vqa", "d", vqa_accuracy=70.0),
        _summary_row("m1", "full", "w3", "vqa", "d", vqa_accuracy=70.0),
        _summary_row("m1", "full", "w2", "vqa", "d", vqa_accuracy=40.0),
        _summary_row("m1", "full", "w8", "vqa", "d", vqa_accuracy=60.0),
        # Not generative: never picked.
        _summary_row("c", "none", "baseline", "retrieval", "d", r_mean=50.0),
    ]
    summary = pd.DataFrame(rows)
    picked = pick_examples(summary)
    assert picked == [
        {
            "task": "captioning",
            "dataset": "d",
            "model": "m1",
            "ft": "full",
            "variants": ["baseline", "gptq-w4", "prune-2"],
        },
        {"task": "captioning", "dataset": "e", "model": "m1", "ft": "full", "variants": ["baseline", "bf16"]},
        {"task": "vqa", "dataset": "d", "model": "m1", "ft": "full", "variants": ["w3", "w2", "w4"]},
    ]
    assert pick_examples(summary.sample(frac=1, random_state=1)) == picked  # row order does not matter
    assert pick_examples(summary, max_variants=2)[0]["variants"] == ["baseline", "gptq-w4"]
    # Beyond best and worst: the others from best to worst.
    assert pick_examples(summary, max_variants=9)[0]["variants"] == ["baseline", "gptq-w4", "prune-2", "awq-w4"]
    with pytest.raises(ValueError, match="max_variants"):
        pick_examples(summary, max_variants=0)


def test_samples_where_the_variants_differ_come_first(tmp_path):
    test = _dataset(tmp_path)
    predictions = _caption_predictions()
    # IDS[1] (missing), IDS[3] (another caption), IDS[4] (failed) differ; IDS[0] differs only in case.
    assert pick_samples(test, predictions, "captioning", n=6) == [IDS[1], IDS[3], IDS[4], IDS[0], IDS[2]]
    assert pick_samples(test, predictions, "captioning", n=4) == [IDS[1], IDS[3], IDS[4], IDS[0]]
    assert pick_samples(test, {"baseline": predictions["baseline"]}, "captioning", n=3) == IDS[:3]
    # VQA compares normalised answers: "Two" and "2" agree, "3" differs.
    vqa = {
        "baseline": _predictions(dict.fromkeys(IDS, "2")),
        "w4": _predictions({**dict.fromkeys(IDS, "Two"), IDS[2]: "3"}),
    }
    assert pick_samples(test, vqa, "vqa", n=2) == [IDS[2], IDS[0]]


def test_captioning_figure_shows_truth_and_every_variant_answer(tmp_path):
    test = _dataset(tmp_path)
    fig = example_figure(
        test, tmp_path / "d", _caption_predictions(), "captioning", n=4, title="captioning on d", methods=METHODS
    )
    shown = [IDS[1], IDS[3], IDS[4], IDS[0]]
    image_axes = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in image_axes] == shown
    assert [ax.images[0].get_array().shape[:2] for ax in image_axes] == [(8, 8)] * 4
    texts = _texts(fig)
    strings = [t for t, _ in texts]
    assert fig.texts[0].get_text() == "captioning on d"  # the title, first
    first_reference = dict(zip(test["sample_id"], test["references"], strict=True))
    for sid in shown:
        assert f"reference {IDS[::-1].index(sid)} of {sid}" == first_reference[sid][0]
        assert first_reference[sid][0] in strings
    assert strings.count("reference (1 of 2)") == 4
    for variant in METHODS:
        assert strings.count(variant) == 4  # one header per image
    # The answers under the images: each variant's own text, or "(no prediction)" where missing or failed.
    assert strings.count(f"a caption of {IDS[1]}") == 2  # baseline and awq-w4; prune-2 lacks IDS[1]
    assert "something else" in strings and strings.count(f"a caption of {IDS[3]}") == 2
    assert f"A caption of {IDS[0]}." in strings
    assert strings.count("(no prediction)") == 2  # prune-2 on IDS[1] (missing) and IDS[4] (failed)
    assert f"a caption of {IDS[2]}" not in strings  # not among the four shown
    # A square in the method's colour before each variant's name.
    swatches = [colour for text, colour in texts if text == "■"]
    assert swatches == [to_hex(method_colour(m)) for m in METHODS.values()] * 4
    _assert_no_overlap(fig)
    plt.close(fig)


def test_vqa_marks_answers_right_when_they_match_the_majority_answer(tmp_path):
    test = _dataset(tmp_path)
    predictions = {
        "baseline": _predictions(dict.fromkeys(IDS, "two")),  # normalised to "2", the majority answer
        "w4": _predictions({**dict.fromkeys(IDS, "2"), IDS[0]: "3", IDS[1]: "Two shapes"}),
    }
    fig = example_figure(test, tmp_path / "d", predictions, "vqa", n=2)
    texts = dict(_texts(fig))
    assert f"Q: how many shapes in {IDS[0]}? A: 2" in texts  # question and majority answer
    right, wrong = to_hex(examples._RIGHT), to_hex(examples._WRONG)
    assert texts["✓ two"] == right
    assert texts["✗ 3"] == wrong
    assert texts["✗ Two shapes"] == wrong
    assert [ax.get_title() for ax in fig.axes if ax.images] == [IDS[0], IDS[1]]
    assert sum(t.startswith(("✓", "✗")) for t, _ in _texts(fig)) == 4  # two variants under two images
    _assert_no_overlap(fig)
    plt.close(fig)


def test_real_vs_generated_shows_the_parsed_class_and_whether_it_is_right(tmp_path):
    test = _dataset(tmp_path)  # IDS[0] real, IDS[1] generated, IDS[2] real
    predictions = {
        "baseline": _predictions(
            {IDS[0]: "This image is natural.", IDS[1]: "This image is AI-generated.", IDS[2]: "this is not fake"}
        ),
        "w4": _predictions({IDS[0]: "it looks fake", IDS[1]: "a cat on a sofa", IDS[2]: "this image is real"}),
    }
    fig = example_figure(test, tmp_path / "d", predictions, "real_vs_generated", n=3)
    strings = [t for t, _ in _texts(fig)]
    right, wrong = to_hex(examples._RIGHT), to_hex(examples._WRONG)
    marks = [(t, c) for t, c in _texts(fig) if t.startswith(("✓", "✗"))]
    # In image order (IDS[0], IDS[1], IDS[2]; all differ), baseline then w4 under each image.
    assert marks == [
        ("✓ real", right),
        ("✗ generated", wrong),
        ("✓ generated", right),
        ("✗ unparsed", wrong),
        ("✓ real", right),  # "not fake" is real
        ("✓ real", right),
    ]
    assert [s for s in strings if s in ("real", "generated")] == ["real", "generated", "real"]  # true classes
    assert "“This image is AI-generated.”" in strings  # the text the class was read from
    assert strings.count("(no prediction)") == 0
    _assert_no_overlap(fig)
    plt.close(fig)


def test_long_texts_are_wrapped_and_cut_without_overlap(tmp_path):
    test = _dataset(tmp_path)
    long = " ".join(["an unusually long generated caption"] * 20)
    predictions = {
        "baseline": _predictions(dict.fromkeys(IDS, long)),
        "gptq-w3-g128-language-first+middle+last-attention-mlp": _predictions(dict.fromkeys(IDS, "x" * 200)),
    }
    fig = example_figure(test, tmp_path / "d", predictions, "captioning", n=3)
    long_texts = [t for t in fig.texts if t.get_text().startswith("an unusually")]
    assert len(long_texts) == 3
    assert all(t.get_text().count("\n") == examples._MAX_LINES["answer"] - 1 for t in long_texts)
    assert all(t.get_text().endswith("…") and t.get_fontsize() >= 7 for t in long_texts)
    assert all(t.get_fontsize() >= 7 for t in fig.texts)
    _assert_no_overlap(fig)
    plt.close(fig)


def test_before_after_draws_a_block_per_selection_and_skips_missing_files(
    tmp_path, monkeypatch, caplog, write_predictions
):
    data, preds = tmp_path / "data", tmp_path / "predictions"
    _dataset(data)
    for variant, frame in _caption_predictions().items():
        write_predictions(preds, "m", "full", variant, "captioning", "d", frame)
    summary = pd.DataFrame(
        [
            _summary_row("m", "full", "baseline", "captioning", "d", CIDEr=1.0, method="none"),
            _summary_row("m", "full", "awq-w4", "captioning", "d", CIDEr=0.9, method="awq"),
            _summary_row("m", "full", "prune-2", "captioning", "d", CIDEr=0.3, method="prune_layers"),
            _summary_row("m", "full", "w2", "captioning", "d", CIDEr=0.1, method="uniform"),  # no predictions file
            _summary_row("m", "full", "baseline", "vqa", "gone", vqa_accuracy=50.0, method="none"),  # no test split
        ]
    )
    drawn: list[list[tuple[str, str]]] = []  # the texts of each figure saved
    save = examples._save
    monkeypatch.setattr(examples, "_save", lambda fig, out: (drawn.append(_texts(fig)), save(fig, out))[1])
    with caplog.at_level(logging.WARNING, logger="vlmopt.plots.examples"):
        out = before_after(summary, preds, data, tmp_path / "fig" / "examples.png", n=3)
    assert out.is_file() and mpimg.imread(out).shape[2] == 4
    strings = [t for t, _ in drawn[0]]
    titles = [t for t in strings if t.startswith(("captioning on", "vqa on"))]
    assert titles == ["captioning on d, m / full. CIDEr: baseline 1; awq-w4 0.9 (best of 3 compressed)"]
    # pick_examples chose baseline, awq-w4 (best) and w2 (worst); w2 has no file and is left out.
    headers = [t for t in strings if t in ("baseline", "awq-w4", "prune-2", "w2")]
    assert headers == ["baseline", "awq-w4"] * 3
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "leave out w2" in messages and "skip m/full vqa on gone: no test split" in messages


def test_before_after_without_anything_to_draw_says_why(tmp_path):
    retrieval = pd.DataFrame([_summary_row("c", "none", "baseline", "retrieval", "d", r_mean=50.0)])
    with pytest.raises(ValueError, match="no generative task"):
        before_after(retrieval, tmp_path, tmp_path, tmp_path / "a.png")
    _dataset(tmp_path / "data")
    summary = pd.DataFrame([_summary_row("m", "full", "baseline", "captioning", "d", CIDEr=1.0)])
    with pytest.raises(
        ValueError, match="no before/after examples could be drawn: m/full captioning on d: no predictions"
    ):
        before_after(summary, tmp_path / "predictions", tmp_path / "data", tmp_path / "b.png")
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
