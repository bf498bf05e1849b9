"""Real-vs-generated labeling, the generative task, its training defaults and its scores."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest
import torch

from vlmopt.data import make_shapes
from vlmopt.data.labeling import CSV_NAMES, make_labeled
from vlmopt.finetune.full import training_tasks
from vlmopt.models import FAMILIES, load_model
from vlmopt.pipeline import label_dataset, score_predictions
from vlmopt.tables import write_predictions
from vlmopt.tasks import REAL_VS_GENERATED_QUESTION, get_task, served_tasks, task_vocabulary

KEYS = {"model": "m", "ft": "none", "variant": "baseline", "dataset": "d", "task": "real_vs_generated"}


@pytest.fixture(scope="module")
def labeled_root(shapes_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("labeled")
    test = pd.read_parquet(shapes_root / "test.parquet")
    captions = {sid: "two red circles" for sid in test["sample_id"][:5]}
    reasons = {test["sample_id"][0]: "the background is striped"}
    make_labeled(root, source_root=shapes_root, captions=captions, reasons=reasons)
    return root


@pytest.fixture(scope="module")
def blip_texts(shapes_train):
    from vlmopt.data import dataset_texts

    return dataset_texts(shapes_train) + task_vocabulary(shapes_train.columns)


def test_labeled_tables_csvs_and_image_links(shapes_root, labeled_root):
    source = pd.read_parquet(shapes_root / "test.parquet")
    table = pd.read_parquet(labeled_root / "test.parquet")
    assert list(table.columns) == ["sample_id", "image", "label", "label_name", "text"]
    assert list(table["sample_id"]) == list(source["sample_id"]) and list(table["label"]) == list(source["label"])
    first = table.iloc[0]
    statement = "This image is AI-generated" if first["label"] == 1 else "This image is natural"
    adjective = "AI-generated" if first["label"] == 1 else "natural"
    assert first["text"] == (
        f"{statement}, it is an image of two red circles, and it looks {adjective} because the background is striped."
    )
    assert table["text"].iloc[5] in ("This image is AI-generated.", "This image is natural.")
    csv = pd.read_csv(labeled_root / CSV_NAMES["test"])
    assert list(csv.columns) == ["image", "label", "text"]
    assert csv.equals(table[["image", "label", "text"]])
    assert (labeled_root / CSV_NAMES["train"]).exists() and not (labeled_root / "exp2_val_data9.csv").exists()
    # Images are links to (or copies of) the source's files, at the same relative paths.
    for rel in table["image"][:3]:
        assert (labeled_root / rel).read_bytes() == (shapes_root / rel).read_bytes()
        assert (labeled_root / rel).stat().st_ino == (shapes_root / rel).stat().st_ino


def test_labels_by_colour_are_refused_by_real_vs_generated(tmp_path):
    colours = tmp_path / "colours"
    default = tmp_path / "default"
    make_shapes(colours, seed=3, n_train=4, n_val=2, n_test=12, labels="color")
    make_shapes(default, seed=3, n_train=4, n_val=2, n_test=12)
    a, b = pd.read_parquet(colours / "test.parquet"), pd.read_parquet(default / "test.parquet")
    # Same images, captions and questions; only the label columns differ.
    assert a.drop(columns=["label", "label_name"]).equals(b.drop(columns=["label", "label_name"]))
    digest = [hashlib.sha256((root / a["image"][0]).read_bytes()).hexdigest() for root in (colours, default)]
    assert digest[0] == digest[1]
    assert list(a["label_name"]) == list(a["color"])
    colour_names = ["red", "green", "blue", "yellow", "purple", "orange"]
    assert [colour_names[y] for y in a["label"]] == list(a["label_name"])
    with pytest.raises(ValueError, match="needs exactly 0 'real' and 1 'generated'"):
        make_labeled(tmp_path / "out", source_root=colours)
    with pytest.raises(ValueError, match="labels must be one of"):
        make_shapes(tmp_path / "x", labels="size")


def test_task_targets_prompts_and_training_defaults(shapes_train, labeled_root, blip_texts):
    task = get_task("real_vs_generated")
    labeled = pd.read_parquet(labeled_root / "train.parquet")
    assert task.targets(labeled, 0) == list(labeled["text"])
    statements = task.targets(shapes_train, 0)
    assert statements == [
        "This image is AI-generated." if y == 1 else "This image is natural." for y in shapes_train["label"]
    ]
    for name, family in FAMILIES.items():
        if "vqa" in family.tasks:  # every generative family asks the question its own way
            assert "real_vs_generated" in family.tasks
            assert REAL_VS_GENERATED_QUESTION in family.prompt("real_vs_generated", REAL_VS_GENERATED_QUESTION), name
    blip = load_model("tiny:blip", texts=blip_texts, seed=0)
    # Labels on a captioning + VQA table do not change what default finetuning learns ...
    assert training_tasks(blip, shapes_train, None) == ("captioning", "vqa")
    # ... a labeled table trains the task, and a requested task must have its columns.
    assert training_tasks(blip, labeled, None) == ("real_vs_generated",)
    assert training_tasks(blip, shapes_train, ("real_vs_generated",)) == ("real_vs_generated",)
    with pytest.raises(ValueError, match="finetune task 'captioning' needs column"):
        training_tasks(blip, labeled, ("captioning",))
    assert served_tasks(("captioning", "real_vs_generated"), labeled.columns) == ("real_vs_generated",)
    assert served_tasks(("captioning", "real_vs_generated"), shapes_train.columns, requested=True) == (
        "captioning",
        "real_vs_generated",
    )
    # The tokenizer knows every word of the question and the label texts.
    vocab = set(blip.tokenizer.get_vocab())
    for word in ("real", "ai", "generated", "natural", "because", "image"):
        assert word in vocab


def test_label_dataset_with_a_captioner_does_not_depend_on_batch_size(shapes_root, blip_texts, tmp_path):
    torch.set_num_threads(1)
    model_dir = tmp_path / "blip"
    load_model("tiny:blip", texts=blip_texts, seed=0).save(model_dir)
    texts = []
    for batch_size in (24, 5):
        out = tmp_path / f"labeled-{batch_size}"
        settings = {"source": "labeled", "dataset": "shapes", "captioner": {"model": "blip", "batch_size": batch_size}}
        label_dataset("shapes-labeled", settings, shapes_root, out, captioner_dir=model_dir)
        texts.append(pd.read_parquet(out / "test.parquet")["text"])
    assert list(texts[0]) == list(texts[1])
    assert all(t.startswith(("This image is natural", "This image is AI-generated")) for t in texts[0])
    # The untrained tiny model says something, so captions and reasons are in the texts.
    assert sum(", it is an image of " in t for t in texts[0]) > 0
    assert sum(" because " in t for t in texts[0]) > 0
    with pytest.raises(ValueError, match="no captioner model folder"):
        label_dataset("x", {"captioner": {"model": "blip"}}, shapes_root, tmp_path / "y")


def test_scores_read_the_label_from_generated_text(labeled_root, tmp_path):
    table = pd.read_parquet(labeled_root / "test.parquet")
    said = {0: "this image is natural , it is an image of", 1: "this image is ai - generated ."}
    predictions = [said[int(y)] for y in table["label"]]
    predictions[0] = "two red circles"  # unparsed: wrong
    predictions[1] = said[1 - int(table["label"][1])]  # wrong label
    preds = pd.DataFrame({"sample_id": table["sample_id"], "prediction": predictions, "error": None})
    write_predictions(preds, tmp_path / "p.parquet", {"task": "real_vs_generated"})
    metrics = score_predictions(
        tmp_path / "p.parquet", labeled_root / "test.parquet", tmp_path / "s.parquet", keys=KEYS, settings={}
    )
    n = len(table)
    assert metrics["accuracy"] == pytest.approx(100 * (n - 2) / n)
    assert metrics["n_unparsed"] == 1
    assert sum(v for k, v in metrics.items() if k.startswith("cm_")) == n
    rows = pd.read_parquet(tmp_path / "s.parquet")
    assert set(rows["metric"]) >= {"accuracy", "precision", "recall", "f1", "cm_generated_as_real"}


def test_label_dataset_from_the_command_line(shapes_root, tmp_path):
    from vlmopt.cli import main

    assert main(["label-dataset", str(shapes_root), "--out", str(tmp_path / "labeled")]) == 0
    csv = pd.read_csv(tmp_path / "labeled" / "exp2_train_data9.csv")
    train = pd.read_parquet(shapes_root / "train.parquet")
    assert list(csv["label"]) == list(train["label"])
    assert set(csv["text"]) == {"This image is natural.", "This image is AI-generated."}
