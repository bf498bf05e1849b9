"""The label-reading rule for real-vs-generated answers, and its report (worked examples)."""

import pytest

from vlmopt.data.labeling import label_text
from vlmopt.metrics.real_vs_generated import binary_report, extract_label


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("This image is AI-generated.", 1),
        ("this image is natural .", 0),
        # A word-level tokenizer decodes the hyphen with spaces around it.
        ("this image is ai - generated .", 1),
        ("This image is A.I. generated", 1),
        ("it looks fake", 1),
        ("the photo appears to be authentic", 0),
        # The verdict after a long caption still counts (the replaced study read the first 30 characters).
        ("it is an image of two red circles on the left of a field, and it is ai-generated", 1),
        # A stated verdict beats a verdict word in a caption, wherever each stands.
        ("This image is AI-generated, it is an image of a real dog", 1),
        ("an image of a real dog, this image is ai - generated", 1),
        ("an image of a natural landscape, it looks synthetic", 1),
        # With nothing stated, the first verdict word decides.
        ("a natural landscape", 0),
        ("a synthetic picture of a real dog", 1),
        # Negations flip the deciding word.
        ("this image is not ai-generated", 0),
        ("this isn't real", 1),
        ("it is never fake", 0),
        ("no, it is real", 0),
        # A question echoed back, or no verdict at all, is unknown.
        ("is this image real or ai-generated?", None),
        ("two red circles on the left", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_label(text, label):
    assert extract_label(text) == label


@pytest.mark.parametrize("label", [0, 1])
@pytest.mark.parametrize("caption", [None, "a real dog", "a fake painting of a natural scene"])
@pytest.mark.parametrize("reason", [None, "it looks fake", "the texture is real"])
def test_every_label_text_reads_back_as_its_label(label, caption, reason):
    text = label_text(label, caption, reason)
    assert text.startswith(("This image is natural", "This image is AI-generated"))
    assert extract_label(text) == label


def test_label_text_composition():
    assert label_text(0) == "This image is natural."
    assert (
        label_text(1, "two red circles.", " a checkerboard background ")
        == "This image is AI-generated, it is an image of two red circles, "
        "and it looks AI-generated because a checkerboard background."
    )
    with pytest.raises(ValueError, match="0 \\(real\\) or 1"):
        label_text(2)


def test_binary_report_worked_example():
    # true:      real real gen  gen   gen
    # predicted: real gen  gen  ?     real
    report = binary_report([0, 0, 1, 1, 1], [0, 1, 1, None, 0])
    assert report["accuracy"] == pytest.approx(40.0)  # 2 of 5 right; the unparsed one is wrong
    assert report["precision"] == pytest.approx(50.0)  # 1 of 2 "generated" answers right
    assert report["recall"] == pytest.approx(100 / 3)  # 1 of 3 generated images found
    assert report["f1"] == pytest.approx(40.0)  # 2 * 0.5 * 0.333 / 0.833
    assert report["n_unparsed"] == 1
    assert {k: v for k, v in report.items() if k.startswith("cm_")} == {
        "cm_real_as_real": 1,
        "cm_real_as_generated": 1,
        "cm_real_as_unparsed": 0,
        "cm_generated_as_real": 1,
        "cm_generated_as_generated": 1,
        "cm_generated_as_unparsed": 1,
    }


def test_binary_report_without_positive_answers_and_bad_input():
    report = binary_report([0, 1], [0, 0])
    assert report["precision"] == 0 and report["recall"] == 0 and report["f1"] == 0 and report["accuracy"] == 50
    with pytest.raises(ValueError, match="0 \\(real\\) or 1"):
        binary_report([0, 2], [0, 1])
    with pytest.raises(ValueError, match="2 true labels but 1"):
        binary_report([0, 1], [0])
    with pytest.raises(ValueError, match="no samples"):
        binary_report([], [])
