"""fp16 / bf16 casting as a variant step: every tensor cast, sizes halve, the folder reloads in that dtype."""

from __future__ import annotations

import json

import pytest
import torch

from vlmopt.compress import apply_variant, serialized_size
from vlmopt.compress.saved import load_variant
from vlmopt.models import load_model
from vlmopt.pipeline import compress_model


@pytest.fixture(scope="module", params=["blip", "blip2-opt"])
def model_dir(request, tmp_path_factory, shapes_texts):
    folder = tmp_path_factory.mktemp(request.param)
    load_model(f"tiny:{request.param}", texts=shapes_texts, seed=0).save(folder)
    return folder


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cast_halves_the_model_and_reloads(model_dir, dtype, tmp_path, shapes_test, shapes_root):
    from vlmopt.tasks.encode import calibration_batches

    out = tmp_path / dtype
    dense = load_model(model_dir)
    n_params = sum(p.numel() for p in dense.model.parameters())
    manifest = compress_model(model_dir, out, steps=[{"method": "precision", "dtype": dtype}])
    model = manifest["parameters"]["model"]
    assert model["total"] == n_params
    reloaded = load_variant(out)
    wanted = getattr(torch, dtype)
    # BLIP-2 keeps its Q-Former and query tokens in float32 under float16 (as from_pretrained does).
    kept = {"qformer", "query_tokens"} if model_dir.name.startswith("blip2") and dtype == "float16" else set()
    assert manifest["steps"][0]["structure"]["kept_float32"] == sorted(kept)
    for name, p in reloaded.model.named_parameters():
        assert p.dtype == (torch.float32 if name.split(".")[0] in kept else wanted), name
    bits = sum(p.numel() * p.dtype.itemsize for p in reloaded.model.parameters())
    assert manifest["nominal_size_bytes"] == bits
    assert model["nominal_bits_per_parameter"] == pytest.approx(8 * bits / n_params)
    if not kept:
        assert model["nominal_bits_per_parameter"] == 16.0
    written = json.loads((out / "manifest.json").read_text())
    # The dense model was float32; the kept float32 Q-Former makes up a fifth of tiny BLIP-2.
    assert written["serialized_size_bytes"] < (0.8 if kept else 0.6) * serialized_size(dense.model)
    # The reloaded model computes exactly what a cast of the original computes.
    batches, _ = calibration_batches(dense, shapes_test, shapes_root, n_samples=4, batch_size=4)
    batch = batches[0]
    fresh = load_model(model_dir)
    apply_variant(fresh.model, fresh.parts(), [{"method": "precision", "dtype": dtype}])
    cast = fresh.model
    with torch.no_grad():
        expected = cast(**{k: v.to(wanted) if v.is_floating_point() else v for k, v in batch.items()}).logits
        got = reloaded.model(**{k: v.to(wanted) if v.is_floating_point() else v for k, v in batch.items()}).logits
    assert torch.equal(expected, got)


@pytest.mark.parametrize(
    ("step", "match"),
    [
        ({"method": "precision", "dtype": "float8"}, "dtype='float8' is not allowed"),
        ({"method": "precision", "dtype": "float16", "part": "vision"}, "part does not apply"),
        ({"method": "precision", "dtype": "float16", "role": "mlp"}, "role does not apply"),
        ({"method": "precision"}, "needs setting"),
    ],
)
def test_bad_precision_steps(model_dir, step, match):
    loaded = load_model(model_dir)
    with pytest.raises(ValueError, match=match):
        apply_variant(loaded.model, loaded.parts(), [step])


def test_casting_to_the_current_dtype_is_an_error(model_dir):
    loaded = load_model(model_dir)
    loaded.model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="already bfloat16"):
        apply_variant(loaded.model, loaded.parts(), [{"method": "precision", "dtype": "bfloat16"}])
