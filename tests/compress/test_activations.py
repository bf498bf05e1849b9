"""Simulated per-token activation quantization: the math, the hooks, the manifest and the reload."""

from __future__ import annotations

import pytest
import torch

from vlmopt.compress import ActivationQuantizer, apply_variant
from vlmopt.compress.activations import activation_quantizer
from vlmopt.compress.saved import load_variant
from vlmopt.models import load_model
from vlmopt.pipeline import compress_model


def test_each_token_is_rounded_to_its_own_grid():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    x[1, 2] *= 100  # an outlier token
    quantizer = ActivationQuantizer(4)
    (q,) = quantizer(torch.nn.Identity(), (x,))
    assert q.shape == x.shape
    tokens, qt = x.reshape(-1, 16), q.reshape(-1, 16)
    lo, hi = tokens.amin(1).clamp(max=0), tokens.amax(1).clamp(min=0)
    step = (hi - lo) / 15
    # Every token is reproduced to half its own step and takes at most 16 distinct values.
    assert ((qt - tokens).abs() <= step[:, None] / 2 + 1e-6).all()
    assert all(len(row.unique()) <= 16 for row in qt)
    # The outlier's range does not leak into the other tokens (it would with one scale per tensor).
    ordinary = torch.ones(15, dtype=torch.bool)
    ordinary[7] = False
    assert ((qt - tokens).abs()[ordinary] <= step[ordinary, None] / 2 + 1e-6).all()
    assert step[7] > 50 * step[ordinary].max()
    # A token quantizes the same alone or in a batch.
    (alone,) = quantizer(torch.nn.Identity(), (x[2:3],))
    assert torch.equal(alone, q[2:3])


@torch.no_grad()
def test_fewer_activation_bits_cost_more_output_error():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(8, 10, 64)
    exact = linear(x)
    errors = {}
    for bits in (8, 4, 2):
        (q,) = ActivationQuantizer(bits)(linear, (x,))
        errors[bits] = float((linear(q) - exact).norm() / exact.norm())
    assert 0 < errors[8] < errors[4] / 8 < errors[2] / 8
    assert errors[8] < 0.01


@pytest.fixture(scope="module")
def batch(blip2_dir, shapes_test, shapes_root):
    from vlmopt.tasks.encode import calibration_batches

    batches, _ = calibration_batches(load_model(blip2_dir), shapes_test, shapes_root, n_samples=4, batch_size=4)
    return batches[0]


def _logits(loaded, batch):
    with torch.no_grad():
        return loaded.model(**batch).logits


W8A4 = {"method": "uniform", "bits": 8, "part": "language", "role": "mlp", "activation_bits": 4}


def test_activation_bits_hook_the_selected_modules_and_change_the_output(blip2_dir, batch):
    weights_only = load_model(blip2_dir)
    apply_variant(weights_only.model, weights_only.parts(), [{**W8A4, "activation_bits": None}])
    loaded = load_model(blip2_dir)
    manifest = apply_variant(loaded.model, loaded.parts(), [W8A4])
    names = [m["name"] for m in manifest["changed_modules"]]
    n_layers = loaded.model.config.text_config.num_hidden_layers
    assert len(names) == 2 * n_layers and all(n.endswith(("fc1", "fc2")) for n in names)
    assert [m["activation_bits"] for m in manifest["steps"][0]["modules"]] == [4] * len(names)
    hooked = [n for n, m in loaded.model.named_modules() if activation_quantizer(m) is not None]
    assert hooked == names
    # Same weights in both models: the difference is the quantized inputs alone.
    pairs = zip(weights_only.model.parameters(), loaded.model.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.allclose(_logits(weights_only, batch), _logits(loaded, batch), atol=1e-3)


def test_predictions_do_not_depend_on_the_batch(blip2_dir, batch):
    loaded = load_model(blip2_dir)
    apply_variant(loaded.model, loaded.parts(), [{**W8A4, "part": "all", "role": "both"}])
    together = _logits(loaded, batch)
    for i in range(len(batch["input_ids"])):
        alone = _logits(loaded, {k: v[i : i + 1] for k, v in batch.items()})
        torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=1e-5)


def test_reload_reattaches_the_quantizers_under_their_final_names(blip2_dir, batch, tmp_path):
    steps = [W8A4, {"method": "prune_layers", "part": "language", "layers": [0]}]
    out = tmp_path / "w8a4-pruned"
    loaded = load_model(blip2_dir)
    compress_model(blip2_dir, out, steps=steps)
    apply_variant(loaded.model, loaded.parts(), steps)
    reloaded = load_variant(out)
    hooked = sorted(n for n, m in reloaded.model.named_modules() if activation_quantizer(m) is not None)
    # Layer 1 became layer 0; the quantizers of the dropped layer 0 are gone with it.
    remaining = reloaded.model.config.text_config.num_hidden_layers
    assert hooked == sorted(
        f"language_model.model.decoder.layers.{i}.{fc}" for i in range(remaining) for fc in ("fc1", "fc2")
    )
    torch.testing.assert_close(_logits(reloaded, batch), _logits(loaded, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [1, 9, 16, True, "8"])
def test_bad_activation_bits_are_named(blip2_dir, bits):
    loaded = load_model(blip2_dir)
    with pytest.raises(ValueError, match=f"activation_bits={bits!r} is not allowed"):
        apply_variant(loaded.model, loaded.parts(), [{**W8A4, "activation_bits": bits}])
