from __future__ import annotations

import pytest
import torch

from vlmopt.compress.quant import (
    CHANGE_TOLERANCE,
    QuantSpec,
    choose_qparams,
    count_changed,
    dequantize,
    fake_quantize,
    grid_step,
    quant_range,
    quantize,
)

SPECS = [
    {"granularity": "per_tensor"},
    {"granularity": "per_channel"},
    {"granularity": "group", "group_size": 16},
    {"granularity": "per_channel", "symmetric": True},
    {"granularity": "group", "group_size": 16, "symmetric": True},
]


def weights_with_outliers(rows: int = 32, cols: int = 64, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=dtype) * torch.logspace(-2, 0, rows, dtype=dtype)[:, None]
    w[3, 5] = 8.0
    w[17, 40] = -6.0
    return w


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def test_per_channel_beats_per_tensor_with_outliers() -> None:
    w = weights_with_outliers()
    for bits in (2, 4, 8):
        per_tensor = mse(fake_quantize(w, QuantSpec(bits, "per_tensor")), w)
        per_channel = mse(fake_quantize(w, QuantSpec(bits, "per_channel")), w)
        group = mse(fake_quantize(w, QuantSpec(bits, "group", group_size=8)), w)
        assert group < per_channel < per_tensor


@pytest.mark.parametrize("kw", SPECS)
def test_error_decreases_with_bits(kw) -> None:
    w = weights_with_outliers()
    errors = [mse(fake_quantize(w, QuantSpec(bits, **kw)), w) for bits in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors


@pytest.mark.parametrize("kw", SPECS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_max_error_is_half_a_step(kw, bits) -> None:
    w = weights_with_outliers(cols=60)  # 60 is not a multiple of 16: the last group is short
    spec = QuantSpec(bits, **kw)
    scale, _ = choose_qparams(w, spec)
    # error of every element against its own block's scale
    per_element_scale = dequantize(torch.ones_like(w, dtype=torch.int8), scale, torch.zeros_like(scale), spec)
    err = (fake_quantize(w, spec) - w).abs()
    assert torch.all(err <= per_element_scale / 2 * (1 + 1e-12))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_distinct_values_per_row(bits) -> None:
    w = torch.rand(16, 4096, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for symmetric, limit in ((False, 2**bits), (True, 2**bits - 1)):
        spec = QuantSpec(bits, "per_channel", symmetric=symmetric)
        fq = fake_quantize(w, spec)
        counts = [row.unique().numel() for row in fq]
        assert max(counts) <= limit
        assert max(counts) >= limit - 2  # 4096 uniform samples use (almost) every level
        q = quantize(w, *choose_qparams(w, spec), spec)
        qmin, qmax = quant_range(bits, symmetric)
        assert int(q.min()) >= qmin and int(q.max()) <= qmax


def test_symmetric_and_asymmetric_as_documented() -> None:
    w = weights_with_outliers(dtype=torch.float32)
    sym = QuantSpec(4, "per_channel", symmetric=True)
    asym = QuantSpec(4, "per_channel")
    scale, zp = choose_qparams(w, sym)
    assert torch.all(zp == 0)
    assert torch.allclose(scale.squeeze(), w.abs().amax(1) / 7)
    q = quantize(w, scale, zp, sym)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 7
    # symmetric is odd: quantizing -w gives -fake_quantize(w)
    assert torch.equal(fake_quantize(-w, sym), -fake_quantize(w, sym))
    # asymmetric uses 16 levels over [min(w, 0), max(w, 0)] with an integer zero point
    scale, zp = choose_qparams(w, asym)
    assert torch.allclose(scale.squeeze(), (w.amax(1) - w.amin(1)) / 15)
    assert torch.equal(zp, zp.round()) and int(zp.min()) >= 0 and int(zp.max()) <= 15
    assert quantize(w, scale, zp, asym).dtype == torch.uint8
    # zero stays exactly zero in both
    w0 = w.clone()
    w0[:, 0] = 0
    assert torch.all(fake_quantize(w0, asym)[:, 0] == 0) and torch.all(fake_quantize(w0, sym)[:, 0] == 0)
    # on skewed (mostly positive) rows asymmetric wastes no levels and is more accurate
    skewed = w.abs() + 0.1
    assert mse(fake_quantize(skewed, asym), skewed) < mse(fake_quantize(skewed, sym), skewed)


def test_round_trip_equals_fake_quantize() -> None:
    w = weights_with_outliers(dtype=torch.float32)
    for kw in SPECS:
        spec = QuantSpec(3, **kw)
        scale, zp = choose_qparams(w, spec)
        assert torch.equal(dequantize(quantize(w, scale, zp, spec), scale, zp, spec), fake_quantize(w, spec))


def test_group_equal_to_row_is_per_channel_and_ragged_groups_work() -> None:
    w = weights_with_outliers(cols=64)
    assert torch.equal(fake_quantize(w, QuantSpec(4, "group", group_size=64)), fake_quantize(w, QuantSpec(4)))
    ragged = weights_with_outliers(cols=50)
    fq = fake_quantize(ragged, QuantSpec(4, "group", group_size=16))
    assert fq.shape == ragged.shape
    # the short last group (2 columns) is quantized on its own range
    tail = QuantSpec(4, "per_channel")
    assert torch.equal(fq[:, 48:], fake_quantize(ragged[:, 48:], tail))
    assert choose_qparams(ragged, QuantSpec(4, "group", group_size=16))[0].shape == (32, 4, 1)


def test_constant_rows_do_not_produce_nan() -> None:
    w = torch.randn(4, 10)
    w[0] = 0.0
    w[1] = 3.0
    w[2] = -1.5
    for kw in SPECS:
        fq = fake_quantize(w, QuantSpec(2, **{**kw, "group_size": 5} if "group_size" in kw else kw))
        assert torch.isfinite(fq).all()
        assert torch.equal(fq[0], torch.zeros(10))
    fq = fake_quantize(w, QuantSpec(4, "per_channel"))
    assert torch.allclose(fq[1], torch.full((10,), 3.0)) and torch.allclose(fq[2], torch.full((10,), -1.5))
    assert torch.equal(fake_quantize(torch.zeros(3, 3), QuantSpec(8, "per_tensor")), torch.zeros(3, 3))


def test_keeps_dtype() -> None:
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    fq = fake_quantize(w, QuantSpec(4))
    assert fq.dtype == torch.bfloat16 and fq.shape == w.shape
    assert float((fq.float() - w.float()).abs().max()) < float(w.float().abs().max()) / 7 + 1e-2


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"bits": 1}, "bits=1"),
        ({"bits": 9}, "bits=9"),
        ({"bits": 16}, "bits=16"),
        ({"bits": 4.0}, "bits=4.0"),
        ({"bits": True}, "bits=True"),
        ({"bits": 4, "granularity": "per_row"}, "granularity='per_row'.*per_channel, per_tensor, group"),
        ({"bits": 4, "granularity": "group"}, "group_size"),
        ({"bits": 4, "granularity": "group", "group_size": 0}, "group_size"),
        ({"bits": 4, "group_size": 128}, "group_size=128 only applies"),
        ({"bits": 4, "symmetric": "yes"}, "symmetric"),
    ],
)
def test_spec_validation(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kw)


@pytest.mark.parametrize("kw", [*SPECS, {"granularity": "group", "group_size": 24}])
def test_grid_step_is_each_elements_block_scale(kw) -> None:
    w = weights_with_outliers(dtype=torch.float32)
    spec = QuantSpec(4, **kw)
    step = grid_step(w, spec)
    assert step.shape == w.shape and bool((step > 0).all())
    scale, zero_point = choose_qparams(w, spec)
    q = quantize(w, scale, zero_point, spec)
    # Neighbouring integer levels of every element lie exactly one step apart.
    up = dequantize(q.to(torch.float32) + 1, scale, zero_point, spec) - dequantize(q, scale, zero_point, spec)
    torch.testing.assert_close(up, step)


@pytest.mark.parametrize("bits", [8, 4])
def test_count_changed_ignores_float_rounding(bits) -> None:
    """Rounding twice moves elements by float rounding only; rounding once moves nearly all of them."""
    w = weights_with_outliers(dtype=torch.float32)
    spec = QuantSpec(bits, "group", group_size=16)
    once = fake_quantize(w, spec)
    twice = fake_quantize(once, spec)
    assert bool((twice != once).any())  # exact equality would call this a change
    assert count_changed(once, twice, grid_step(once, spec)) == 0
    assert count_changed(w, once, grid_step(w, spec)) > 0.9 * w.numel()


def test_count_changed_threshold() -> None:
    old = torch.zeros(4, dtype=torch.float32)
    step = torch.tensor([1.0, 1.0, 2.0, 2.0])
    new = torch.tensor([0.5, 0.9 * CHANGE_TOLERANCE, 1.1 * CHANGE_TOLERANCE, 3 * CHANGE_TOLERANCE])
    # Moves of 0.5, 0.0009, 0.00055 and 0.0015 steps: the first and last count.
    assert count_changed(old, new, step) == 2
    assert count_changed(old.double(), new, torch.tensor(1.0)) == 3
    with pytest.raises(ValueError, match="shapes differ"):
        count_changed(old, new[:3], step)
