"""Errors that need no weights are found when the study is planned: step order, parts, layer
counts, missing folders, study files that name no study."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch

from vlmopt.model_source import check_source, source_kind
from vlmopt.models import load_model
from vlmopt.models.skeleton import model_skeleton
from vlmopt.study import StudyError, check_study, check_study_file, check_variant_steps

LAYERS_3 = {"vision": 3, "bridge": 3, "language": 3}


def _study(source: str, variants: dict) -> dict:
    return {
        "study": "t",
        "datasets": {"d": {"source": "synthetic"}},
        "models": {"m": {"source": source, "tokenizer_dataset": "d"}},
        "variants": {"baseline": [], **variants},
        "runs": [{"models": ["m"], "finetune": ["none"], "variants": "all", "tasks": {"captioning": "d"}}],
    }


def test_misordered_variants_are_all_named_before_anything_runs():
    config = _study(
        "tiny:blip2-opt",
        {
            "int8-then-w4": [
                {"method": "dynamic_int8", "part": "language"},
                {"method": "uniform", "bits": 4, "part": "language"},
            ],
            "w4-then-lora": [
                {"method": "uniform", "bits": 4, "part": "language"},
                {"method": "lora", "dataset": "d", "targets": ["q_proj"]},
            ],
            "lora-then-w4": [
                {"method": "lora", "dataset": "d", "targets": ["q_proj"]},
                {"method": "uniform", "bits": 4, "part": "language"},
            ],
        },
    )
    with pytest.raises(StudyError) as err:
        check_variant_steps(config)
    message = str(err.value)
    assert message.startswith("2 variant(s) order their steps wrongly")
    assert "variants.int8-then-w4: step 1: uniform comes after the runtime step dynamic_int8" in message
    assert "variants.w4-then-lora: step 1: a merged lora step after uniform" in message
    assert "lora-then-w4" not in message  # LoRA first, then quantize: the recommended order


def test_selections_and_layer_counts_are_checked_on_a_tiny_family():
    config = _study(
        "tiny:blip",
        {
            "bridge-w4": [{"method": "uniform", "bits": 4, "part": "bridge"}],
            "drop-all": [{"method": "prune_layers", "part": "language", "drop_last": 3}],
            "keep-1-then-w8": [
                {"method": "prune_layers", "part": "language", "keep": 1},
                {"method": "uniform", "bits": 8, "part": "language", "position": "last"},
            ],
            "fine": [
                {"method": "prune_layers", "part": "language", "keep": 2},
                {"method": "uniform", "bits": 8, "part": "language"},
            ],
        },
    )
    with pytest.raises(StudyError) as err:
        check_study(config)
    message = str(err.value)
    assert message.startswith("2 variant(s) cannot be applied")
    assert "variants.bridge-w4 on model 'm' (blip): step 0: uniform: no Linear module matches part='bridge'" in message
    assert "variants.drop-all on model 'm' (blip): step 0: prune_layers: drop_last=3 would drop all 3 layers" in message
    # One language layer is left, and it is the last: the second step sees the pruned part.
    assert "keep-1-then-w8" not in message and "fine" not in message


def test_a_local_folder_is_checked_from_its_config_on_the_meta_device(tmp_path):
    folder = tmp_path / "blip2"
    load_model("tiny:blip2-opt").save(folder)
    family, skeleton = model_skeleton(str(folder))
    assert family.name == "blip2-opt"
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    assert {k: len(v) for k, v in family.parts(skeleton).items()} == LAYERS_3
    config = _study(str(folder), {"drop-4": [{"method": "prune_layers", "part": "vision", "layers": [0, 1, 2]}]})
    with pytest.raises(
        StudyError,
        match=r"variants\.drop-4 on model 'm' \(blip2-opt\): step 0: prune_layers: "
        r"layers=\[0, 1, 2\] would drop all 3 layers of part 'vision'",
    ):
        check_study(config)


def test_a_hub_model_is_checked_when_its_config_is_cached_and_skipped_otherwise(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny-clip" / "snapshots" / ("a" * 40)
    load_model("tiny:clip").model.config.save_pretrained(snapshot)
    (cache / "models--org--tiny-clip" / "refs").mkdir()
    (cache / "models--org--tiny-clip" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    family, skeleton = model_skeleton("org/tiny-clip")
    assert family.name == "clip" and next(skeleton.parameters()).device == torch.device("meta")
    config = _study("org/tiny-clip", {"bridge": [{"method": "svd", "ratio": 0.5, "part": "bridge"}]})
    with pytest.raises(StudyError, match=r"variants\.bridge on model 'm' \(clip\): step 0: svd: no Linear module"):
        check_study(config)
    # Not cached: nothing is downloaded to check it; the compress job checks it when it loads the model.
    assert model_skeleton("org/not-cached") is None
    check_study(_study("org/not-cached", {"bridge": [{"method": "svd", "ratio": 0.5, "part": "bridge"}]}))


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("tiny:blip", "tiny"),
        ("Salesforce/blip2-opt-2.7b", "hub"),
        ("gpt2", "hub"),
        ("/models/blip", "folder"),
        ("./blip", "folder"),
        ("../models/blip", "folder"),
        ("~/models/blip", "folder"),
        ("models/blip/v2", "folder"),
    ],
)
def test_source_kinds(source, kind):
    assert source_kind(source) == kind


def test_a_missing_local_folder_is_named_at_planning_and_at_loading(tmp_path):
    missing = str(tmp_path / "no-such-model")
    config = _study(missing, {})
    with pytest.raises(StudyError, match=f"models.m.source: local model folder '{missing}' does not exist"):
        check_study(config)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(missing)
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        check_source(str(tmp_path / "weights.bin"))
    check_source("Salesforce/blip2-opt-2.7b")  # a hub id: nothing to check on disk


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "is empty"),
        ("{}\n", "is empty"),
        ("# nothing but a comment\n", "is empty"),
        ("- a\n- b\n", "must be a mapping"),
        ("seed: 1\nmodels: {}\n", r"names no study: add `study: <name>` \(it has seed, models\)"),
        ("study: [\n", "cannot be read"),
    ],
)
def test_a_study_file_must_name_its_study(tmp_path, text, match):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(StudyError, match=match):
        check_study_file(path)


def test_a_named_study_file_passes(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("study: mine\nseed: 0\n")
    check_study_file(path)
