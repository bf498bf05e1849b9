"""Peak memory: RSS sampling on the CPU, the CUDA allocator's peak through fakes."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from vlmopt.profiling.memory import MIB, PeakMemory, measure_peak_memory, rss_bytes

N_FLOATS = 50_000_000  # 200 MB of float32


def test_an_array_alive_at_the_end_raises_the_peak():
    with PeakMemory() as meter:
        array = np.ones(N_FLOATS, dtype=np.float32)
    stats = meter.result
    del array
    assert stats.peak_delta_mb >= 150
    assert stats.peak_mb == pytest.approx(stats.baseline_mb + stats.peak_delta_mb)
    assert stats.method.startswith("RSS sampled every 1 ms")
    assert (stats.unit, stats.device) == ("MiB", "cpu")


def test_the_sampler_catches_memory_freed_inside_the_region():
    with PeakMemory() as meter:
        tensor = torch.ones(N_FLOATS)
        time.sleep(0.05)  # the sampling thread reads RSS while the tensor lives
        del tensor
    stats = meter.result
    assert stats.peak_delta_mb >= 150
    assert stats.n_samples > 10
    # The tensor is gone and its pages are back with the system: only the sampler saw the peak.
    assert rss_bytes() / MIB < stats.peak_mb - 100


def test_an_empty_region_stays_near_its_baseline():
    stats = measure_peak_memory(lambda: None)
    assert 0 <= stats.peak_delta_mb < 10
    assert stats.baseline_mb > 0


def test_result_before_the_end_is_an_error():
    meter = PeakMemory()
    with pytest.raises(RuntimeError, match="after the with block"):
        _ = meter.result
    with pytest.raises(ValueError, match="cpu and cuda"):
        PeakMemory("meta")
    with pytest.raises(ValueError, match="interval_s"):
        PeakMemory(interval_s=0)


def test_cuda_peak_is_reset_then_read(monkeypatch):
    calls = []

    def reset(device):
        calls.append(("reset", device))

    def allocated(device):
        calls.append(("allocated", device))
        return 100 * MIB

    def peak(device):
        calls.append(("max", device))
        return 612 * MIB + MIB // 2

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "memory_allocated", allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", peak)
    with PeakMemory("cuda:1") as meter:
        calls.append("body")
    stats = meter.result
    device = torch.device("cuda:1")
    assert calls == [("reset", device), ("allocated", device), "body", ("max", device)]
    assert (stats.peak_mb, stats.baseline_mb, stats.peak_delta_mb) == (612.5, 100.0, 512.5)
    assert stats.method == "torch.cuda.max_memory_allocated"
    assert stats.device == "cuda:1"


def test_cuda_without_statistics_names_the_device(monkeypatch):
    def broken(device):
        raise RuntimeError("Torch not compiled with CUDA enabled")

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", broken)
    with pytest.raises(RuntimeError, match=r"PeakMemory\(cuda:0\): CUDA memory statistics are unavailable"):
        with PeakMemory("cuda:0"):
            pass
