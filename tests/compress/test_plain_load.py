"""No silent wrong loads: plain transformers either loads a variant folder as vlmopt does, or refuses it.

Each kind of variant is saved from a tiny CLIP. One fresh Python process, which never imports
vlmopt, then calls ``CLIPModel.from_pretrained`` and ``AutoModel.from_pretrained`` on every folder:
the folders plain transformers cannot rebuild must make both fail with a message naming vlmopt and
``load_variant``; the others must load and compute what :func:`load_variant` computes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from vlmopt.compress.saved import PLAIN_LOAD_KEY, load_variant, plain_load_blockers
from vlmopt.models import load_model
from vlmopt.pipeline import compress_loaded


def _variants(dataset: str) -> dict[str, list[dict]]:
    train = {"dataset": dataset, "training": {"max_steps": 2, "batch_size": 4, "lr": 1.0e-2}}
    return {
        # What plain from_pretrained would build wrongly.
        "svd": [{"method": "svd", "ratio": 0.5, "part": "all", "role": "mlp"}],
        "prune_heads": [{"method": "prune_heads", "part": "all", "heads": 1}],
        "uniform_activations": [{"method": "uniform", "bits": 4, "part": "language", "activation_bits": 8}],
        "dynamic_int8": [{"method": "dynamic_int8", "part": "all"}],
        "lora_kept": [{"method": "lora", "part": "language", "r": 2, "merge": False, **train}],
        # A plain-loadable step before one that is not: the folder is still refused.
        "prune_layers_then_svd": [
            {"method": "prune_layers", "part": "language", "drop_last": 1},
            {"method": "svd", "ratio": 0.5, "part": "vision", "role": "mlp"},
        ],
        # Ordinary weights of the config's architecture.
        "uniform": [{"method": "uniform", "bits": 4, "part": "all"}],
        "prune_layers": [{"method": "prune_layers", "part": "language", "drop_last": 1}],
        "precision": [{"method": "precision", "dtype": "float16"}],
        "lora_merged": [{"method": "lora", "part": "language", "r": 2, "merge": True, **train}],
        "composed_plain": [
            {"method": "prune_layers", "part": "vision", "drop_last": 1},
            {"method": "uniform", "bits": 8, "part": "all"},
        ],
    }


REFUSED = ("svd", "prune_heads", "uniform_activations", "dynamic_int8", "lora_kept", "prune_layers_then_svd")
LOADABLE = ("uniform", "prune_layers", "precision", "lora_merged", "composed_plain")

#: Run by a fresh interpreter: plain transformers on each folder, without vlmopt.
PLAIN_LOADER = """
import json, sys
import torch
from transformers import AutoModel, CLIPModel

root = sys.argv[1]
names = json.loads(sys.argv[2])
inputs = torch.load(f"{root}/inputs.pt")
results = {}
for name in names:
    folder = f"{root}/{name}"
    result = {}
    for cls in (CLIPModel, AutoModel):
        try:
            model = cls.from_pretrained(folder).eval()
        except Exception as err:
            result[cls.__name__] = {"error": f"{type(err).__name__}: {err}"}
            continue
        dtype = next(model.parameters()).dtype
        batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad():
            logits = model(**batch).logits_per_image.float()
        torch.save(logits, f"{root}/{name}-{cls.__name__}.pt")
        result[cls.__name__] = {"type": type(model).__name__, "dtype": str(dtype)}
    results[name] = result
assert "vlmopt" not in sys.modules, "the plain loader imported vlmopt"
print(json.dumps(results))
"""


def _logits(loaded, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    dtype = next(loaded.model.parameters()).dtype
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        return loaded.model(**batch).logits_per_image.float()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, shapes_texts, shapes_test, shapes_root):
    """Every variant saved under one folder, with the logits of its in-memory model, and what the plain
    loader process made of each folder."""
    from vlmopt.tasks.encode import calibration_batches

    root = tmp_path_factory.mktemp("plain-load")
    source = root / "source"
    load_model("tiny:clip", texts=shapes_texts, seed=0).save(source)
    batches, _ = calibration_batches(load_model(source), shapes_test, shapes_root, n_samples=4, batch_size=4)
    inputs = {k: v for k, v in batches[0].items() if k in ("input_ids", "attention_mask", "pixel_values")}
    torch.save(inputs, root / "inputs.pt")
    variants = _variants(shapes_root.name)
    evaluated = {}
    for name, steps in variants.items():
        loaded = load_model(source)
        compress_loaded(loaded, root / name, steps=steps, data_root=shapes_root.parent, source=source)
        evaluated[name] = _logits(loaded, inputs)
    run = subprocess.run(
        [sys.executable, "-c", PLAIN_LOADER, str(root), json.dumps(list(variants))],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    plain = json.loads(run.stdout.strip().splitlines()[-1])
    return root, inputs, evaluated, plain


def test_every_kind_is_covered():
    assert set(REFUSED) | set(LOADABLE) == set(_variants("d"))
    assert not set(REFUSED) & set(LOADABLE)


@pytest.mark.parametrize("name", REFUSED)
def test_plain_from_pretrained_refuses_and_names_the_loader(saved, name):
    root, inputs, evaluated, plain = saved
    for cls in ("CLIPModel", "AutoModel"):
        outcome = plain[name][cls]
        assert "error" in outcome, f"plain {cls}.from_pretrained loaded the {name} variant: {outcome}"
        assert "vlmopt" in outcome["error"] and "load_variant" in outcome["error"], outcome["error"]
        assert outcome["error"].startswith("ValueError"), outcome["error"]
    config = json.loads((root / name / "config.json").read_text())
    assert plain_load_blockers(json.loads((root / name / "manifest.json").read_text()))
    assert PLAIN_LOAD_KEY in config
    # load_variant reads it back as it was evaluated, and leaves the folder as saved.
    reloaded = load_variant(root / name)
    torch.testing.assert_close(_logits(reloaded, inputs), evaluated[name], atol=1e-5, rtol=1e-5)
    assert reloaded.source == str(root / name)
    assert reloaded.model.config.name_or_path == str(root / name)
    assert json.loads((root / name / "config.json").read_text()) == config


@pytest.mark.parametrize("name", LOADABLE)
def test_plain_from_pretrained_loads_what_load_variant_loads(saved, name):
    root, inputs, evaluated, plain = saved
    manifest = json.loads((root / name / "manifest.json").read_text())
    assert plain_load_blockers(manifest) == []
    assert PLAIN_LOAD_KEY not in json.loads((root / name / "config.json").read_text())
    reloaded = load_variant(root / name)
    expected = _logits(reloaded, inputs)
    torch.testing.assert_close(expected, evaluated[name], atol=1e-5, rtol=1e-5)
    for cls in ("CLIPModel", "AutoModel"):
        outcome = plain[name][cls]
        assert "error" not in outcome, outcome
        assert outcome["type"] == "CLIPModel"
        assert outcome["dtype"] == str(next(reloaded.model.parameters()).dtype)
        torch.testing.assert_close(torch.load(root / f"{name}-{cls}.pt"), expected, atol=1e-6, rtol=1e-6)


def test_blockers_follow_the_step_settings():
    def manifest(*steps: dict) -> dict:
        return {"steps": [{"method": s.pop("method"), "settings": s} for s in steps]}

    assert plain_load_blockers(manifest({"method": "uniform", "bits": 4, "activation_bits": None})) == []
    assert plain_load_blockers(manifest({"method": "uniform", "bits": 4, "activation_bits": 8})) == ["uniform"]
    assert plain_load_blockers(manifest({"method": "lora", "merge": True})) == []
    assert plain_load_blockers(manifest({"method": "lora", "merge": False})) == ["lora"]
    assert plain_load_blockers(manifest({"method": "svd"}, {"method": "prune_heads"}, {"method": "svd"})) == [
        "svd",
        "prune_heads",
    ]
    assert plain_load_blockers(None) == []
    with pytest.raises(ValueError, match="unknown compression method"):
        plain_load_blockers(manifest({"method": "nope"}))


def test_a_marked_folder_without_its_manifest_is_an_error(saved, tmp_path):
    root = saved[0]
    copy = tmp_path / "svd"
    shutil.copytree(root / "svd", copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no manifest.json"):
        load_variant(copy)
