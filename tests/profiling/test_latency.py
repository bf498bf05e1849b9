"""Latency statistics with injected clocks: exact durations, warm-up handling, CUDA event ordering."""

from __future__ import annotations

import statistics

import pytest
import torch

from vlmopt.profiling import latency as latency_module
from vlmopt.profiling.latency import (
    CudaEventClock,
    measure_latency,
    per_sample,
    samples_per_second,
    tokens_per_second,
)


class ScriptedClock:
    """Returns the given durations in order and logs start/stop calls."""

    method = "scripted clock"

    def __init__(self, durations, log=None):
        self.durations = list(durations)
        self.log = log if log is not None else []

    def start(self):
        self.log.append("start")

    def stop(self):
        self.log.append("stop")
        return self.durations.pop(0)


def test_statistics_of_exact_durations():
    clock = ScriptedClock([5.0, 1.0, 3.0, 2.0, 4.0])
    stats = measure_latency(lambda: None, warmup=2, repeats=5, clock=clock)
    assert stats.samples_ms == (5.0, 1.0, 3.0, 2.0, 4.0)
    assert stats.median_ms == 3.0
    # numpy "linear": rank 0.95 * (5 - 1) = 3.8 in the sorted samples, between 4 and 5.
    assert stats.p95_ms == pytest.approx(4.8)
    assert stats.mean_ms == 3.0
    assert stats.std_ms == pytest.approx(statistics.stdev([5, 1, 3, 2, 4]))
    assert (stats.min_ms, stats.max_ms, stats.n) == (1.0, 5.0, 5)
    assert stats.unit == "ms" and stats.device == "cpu"
    assert stats.method.startswith("scripted clock, 2 warm-up + 5 runs, median")
    assert "linear" in stats.method


def test_p95_interpolates_between_the_two_slowest_of_ten():
    durations = [float(v) for v in range(1, 11)]
    stats = measure_latency(lambda: None, warmup=0, repeats=10, clock=ScriptedClock(durations))
    assert stats.p95_ms == pytest.approx(9.55)  # rank 8.55: 9 + 0.55 * (10 - 9)
    assert stats.median_ms == 5.5


def test_warmup_runs_are_not_timed():
    log = []
    clock = ScriptedClock([1.0, 1.0], log)
    measure_latency(lambda: log.append("fn"), warmup=3, repeats=2, clock=clock)
    assert log == ["fn", "fn", "fn", "start", "fn", "stop", "start", "fn", "stop"]


def test_single_run_has_zero_spread():
    stats = measure_latency(lambda: None, warmup=0, repeats=1, clock=ScriptedClock([7.5]))
    assert (stats.median_ms, stats.p95_ms, stats.std_ms, stats.n) == (7.5, 7.5, 0.0, 1)


def test_default_cpu_clock_is_perf_counter_ns(monkeypatch):
    ticks = iter([1_000_000, 3_500_000, 10_000_000, 10_250_000])
    monkeypatch.setattr(latency_module.time, "perf_counter_ns", lambda: next(ticks))
    stats = measure_latency(lambda: None, warmup=1, repeats=2)
    assert stats.samples_ms == (2.5, 0.25)
    assert stats.method.startswith("time.perf_counter_ns, 1 warm-up + 2 runs")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup": -1}, "warmup must be >= 0"),
        ({"repeats": 0}, "repeats must be >= 1"),
        ({"repeats": 2.5}, "repeats must be an integer"),
        ({"warmup": True}, "warmup must be an integer"),
    ],
)
def test_invalid_counts_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        measure_latency(lambda: None, clock=ScriptedClock([1.0]), **kwargs)


def test_non_callable_is_rejected():
    with pytest.raises(ValueError, match="needs a callable"):
        measure_latency(42)


class FakeEvent:
    """Stands in for torch.cuda.Event: elapsed_time fails unless the end event was synchronized."""

    created = []

    def __init__(self, enable_timing=False):
        assert enable_timing, "timing events need enable_timing=True"
        self.log = FakeEvent.log
        self.synchronized = False
        self.id = len(FakeEvent.created)
        FakeEvent.created.append(self)

    def record(self, stream=None):
        self.synchronized = False
        self.log.append(("record", self.id, stream))

    def synchronize(self):
        self.synchronized = True
        self.log.append(("synchronize", self.id))

    def elapsed_time(self, end):
        if not end.synchronized:
            raise RuntimeError("elapsed_time read before the end event completed")
        self.log.append(("elapsed", self.id, end.id))
        return FakeEvent.durations.pop(0)


@pytest.fixture
def fake_events(monkeypatch):
    FakeEvent.created, FakeEvent.log, FakeEvent.durations = [], [], [4.0, 2.0, 6.0]
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    return FakeEvent


def test_cuda_event_clock_synchronizes_before_reading(fake_events):
    log = fake_events.log
    stats = measure_latency(lambda: log.append("fn"), warmup=1, repeats=3, clock=CudaEventClock())
    assert stats.samples_ms == (4.0, 2.0, 6.0)
    assert stats.median_ms == 4.0 and stats.method.startswith("cuda events")
    assert len(fake_events.created) == 2  # one pair reused for every run
    run = [("record", 0, None), "fn", ("record", 1, None), ("synchronize", 1), ("elapsed", 0, 1)]
    assert log == ["fn", *run, *run, *run]


def test_cuda_device_chooses_events_on_its_stream(fake_events, monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: f"stream of {device}")
    stats = measure_latency(lambda: None, warmup=0, repeats=3, device="cuda:1")
    assert stats.device == "cuda:1" and stats.method.startswith("cuda events")
    assert fake_events.log[0] == ("record", 0, "stream of cuda:1")
    assert stats.samples_ms == (4.0, 2.0, 6.0)


def test_cuda_event_clock_needs_start_first(fake_events):
    with pytest.raises(RuntimeError, match="before start"):
        CudaEventClock().stop()
    with pytest.raises(ValueError, match="needs a cuda device"):
        CudaEventClock("cpu")


def test_per_sample_and_throughput():
    stats = measure_latency(lambda: None, warmup=0, repeats=3, clock=ScriptedClock([16.0, 32.0, 8.0]))
    each = per_sample(stats, 32)
    assert each.unit == "ms/sample"
    assert each.median_ms == 0.5 and each.max_ms == 1.0 and each.min_ms == 0.25
    assert each.samples_ms == (0.5, 1.0, 0.25)
    assert each.method.endswith("divided by batch size 32")
    with pytest.raises(ValueError, match="per-call statistics"):
        per_sample(each, 2)
    rate = samples_per_second(stats, 32)
    assert (rate.value, rate.unit) == (2000.0, "samples/s")
    tokens = tokens_per_second(stats, 32 * 20)
    assert (tokens.value, tokens.unit) == (40000.0, "tokens/s")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        samples_per_second(stats, 0)
    with pytest.raises(ValueError, match="tokens must be a positive number"):
        tokens_per_second(stats, 0)
