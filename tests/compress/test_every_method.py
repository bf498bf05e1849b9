"""Every method on every tiny family: it changes the model, saves, and reads back as evaluated."""

from __future__ import annotations

import pytest
import torch

from tests.compress.test_every_family import NOT_APPLICABLE
from vlmopt.compress import METHODS
from vlmopt.compress.saved import load_variant
from vlmopt.models import FAMILIES, load_model
from vlmopt.pipeline import compress_loaded

#: Variants beyond one per method: a second backend, and a composed variant.
EXTRA = ("dynamic_int8-fbgemm", "composed")


def _calibration(root):
    return {"dataset": root.name, "split": "train", "n": 8, "batch_size": 4}


def _variants(root, part: str = "language") -> dict[str, list[dict]]:
    """The variant of each method; ``part`` is where the part-specific ones act (the language model)."""
    train = {"dataset": root.name, "training": {"max_steps": 4, "batch_size": 4, "lr": 1.0e-2}}
    return {
        "uniform": [{"method": "uniform", "bits": 4, "part": part, "activation_bits": 8}],
        "dynamic_int8": [{"method": "dynamic_int8", "part": "all"}],
        "dynamic_int8-fbgemm": [{"method": "dynamic_int8", "part": "all", "backend": "fbgemm"}],
        "gptq": [{"method": "gptq", "bits": 4, "group_size": 16, "part": "all", "calibration": _calibration(root)}],
        "awq": [{"method": "awq", "bits": 4, "group_size": 16, "part": part, "calibration": _calibration(root)}],
        "svd": [{"method": "svd", "ratio": 0.5, "part": part, "role": "mlp"}],
        "prune_layers": [{"method": "prune_layers", "part": part, "drop_last": 1}],
        "prune_heads": [{"method": "prune_heads", "part": "all", "heads": 1}],
        "lora": [{"method": "lora", "part": part, "r": 4, "merge": False, **train}],
        "precision": [{"method": "precision", "dtype": "bfloat16"}],
        # The example of a composed variant: prune, recover, then quantize.
        "composed": [
            {"method": "prune_layers", "part": part, "drop_last": 1},
            {"method": "lora", "part": part, "r": 4, **train},
            {"method": "gptq", "bits": 4, "part": part, "calibration": _calibration(root)},
        ],
    }


def test_every_method_is_covered(shapes_root):
    # A new method without an entry in _variants fails here.
    assert set(_variants(shapes_root)) - set(EXTRA) == set(METHODS)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def source(request, tmp_path_factory, shapes_texts):
    folder = tmp_path_factory.mktemp(request.param)
    load_model(f"tiny:{request.param}", texts=shapes_texts, seed=0).save(folder)
    return folder


@pytest.fixture(scope="module")
def batch(source, shapes_test, shapes_root):
    from vlmopt.tasks.encode import calibration_batches

    batches, _ = calibration_batches(load_model(source), shapes_test, shapes_root, n_samples=4, batch_size=4)
    return batches[0]


def _logits(loaded, batch) -> torch.Tensor:
    dtype = next(loaded.model.parameters()).dtype
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    with torch.no_grad():
        out = loaded.model(**inputs)
    # Generative families: next-token logits; CLIP: image-text logits; BLIP retrieval: ITM logits.
    for name in ("logits", "logits_per_image", "itm_score"):
        if getattr(out, name, None) is not None:
            return getattr(out, name).float()
    raise AssertionError(f"no logits in {type(out).__name__}")


@pytest.mark.parametrize("method", [*METHODS, *EXTRA])
def test_method_changes_saves_and_reloads(method, source, batch, shapes_root, tmp_path):
    loaded = load_model(source)
    # A family without a language model (BLIP-2 retrieval) gets the part-specific steps on its bridge.
    steps = _variants(shapes_root, "language" if loaded.parts()["language"] else "bridge")[method]
    blocked = [
        NOT_APPLICABLE[(s["method"], loaded.family)] for s in steps if (s["method"], loaded.family) in NOT_APPLICABLE
    ]
    if blocked:
        pytest.skip(f"not applicable (tested to fail clearly in test_every_family): {blocked[0]}")
    dense = _logits(load_model(source), batch)
    out = tmp_path / method
    manifest = compress_loaded(loaded, out, steps=steps, data_root=shapes_root.parent, source=source)
    assert manifest["methods"] == [s["method"] for s in steps]
    assert all(step["n_modules"] > 0 for step in manifest["steps"])
    evaluated = _logits(loaded, batch)
    assert (evaluated - dense).abs().max() > 1e-6, "the variant computes what the dense model does"
    reloaded = load_variant(out)
    torch.testing.assert_close(_logits(reloaded, batch), evaluated, atol=1e-5, rtol=1e-5)
