"""Wall-clock latency of a callable: warm-up runs, timed runs, and order statistics.

On a CUDA device each run is timed with a pair of CUDA events recorded on the device's current
stream around the call; the end event is synchronized before its elapsed time is read, so the
time covers the GPU work the call queued, not only its launch. On the CPU each run is timed with
``time.perf_counter_ns``. The clock is injectable (:class:`Clock`), so a caller or a test can
supply exact durations.

The 95th percentile is numpy's default ``"linear"`` method (type 7 of Hyndman and Fan): the
value at rank ``0.95 * (n - 1)`` of the sorted samples, interpolated linearly between the two
neighbouring samples. With 10 runs it lies between the 9th and 10th fastest. The standard
deviation is the sample standard deviation (``ddof=1``), 0 for a single run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from vlmopt.device import model_device

__all__ = [
    "VisionTimer",
    "Clock",
    "CudaEventClock",
    "LatencyStats",
    "PerfCounterClock",
    "Throughput",
    "measure_latency",
    "per_sample",
    "samples_per_second",
    "tokens_per_second",
]

#: Percentile method passed to :func:`numpy.percentile`.
PERCENTILE_METHOD = "linear"


@runtime_checkable
class Clock(Protocol):
    """Times one run: :meth:`start` before the call, :meth:`stop` after it returns the elapsed milliseconds."""

    method: str

    def start(self) -> None: ...

    def stop(self) -> float: ...


class PerfCounterClock:
    """Host wall-clock time from ``time.perf_counter_ns``."""

    method = "time.perf_counter_ns"

    def __init__(self) -> None:
        self._t0: int | None = None

    def start(self) -> None:
        self._t0 = time.perf_counter_ns()

    def stop(self) -> float:
        end = time.perf_counter_ns()
        if self._t0 is None:
            raise RuntimeError("PerfCounterClock.stop() called before start()")
        elapsed, self._t0 = end - self._t0, None
        return elapsed / 1e6


class CudaEventClock:
    """GPU time between two CUDA events recorded around the call on the device's current stream.

    ``stop`` records the end event, waits for it (``synchronize``) and then reads
    ``start.elapsed_time(end)`` in milliseconds. With ``device=None`` the events go to the current
    stream of the current device.
    """

    method = "cuda events"

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device = None if device is None else torch.device(device)
        if self.device is not None and self.device.type != "cuda":
            raise ValueError(f"CudaEventClock needs a cuda device, got {self.device}")
        self._start: Any = None
        self._end: Any = None
        self._running = False

    def _stream(self) -> Any:
        return None if self.device is None else torch.cuda.current_stream(self.device)

    def start(self) -> None:
        if self._start is None:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
        self._start.record(self._stream())
        self._running = True

    def stop(self) -> float:
        if not self._running:
            raise RuntimeError("CudaEventClock.stop() called before start()")
        self._end.record(self._stream())
        self._end.synchronize()
        self._running = False
        return float(self._start.elapsed_time(self._end))


@dataclass(frozen=True)
class LatencyStats:
    """Order statistics of the timed runs, in ``unit`` (``ms`` per call, or ``ms/sample`` after :func:`per_sample`)."""

    median_ms: float
    p95_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    n: int
    method: str
    device: str
    unit: str = "ms"
    samples_ms: tuple[float, ...] = ()


@dataclass(frozen=True)
class Throughput:
    """Items per second at the median latency."""

    value: float
    unit: str
    method: str


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _stats(samples: list[float], method: str, device: str) -> LatencyStats:
    values = np.asarray(samples, dtype=np.float64)
    return LatencyStats(
        median_ms=float(np.median(values)),
        p95_ms=float(np.percentile(values, 95, method=PERCENTILE_METHOD)),
        mean_ms=float(values.mean()),
        std_ms=float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        min_ms=float(values.min()),
        max_ms=float(values.max()),
        n=len(values),
        method=method,
        device=device,
        samples_ms=tuple(float(v) for v in values),
    )


def measure_latency(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    repeats: int = 10,
    device: str | torch.device | None = None,
    clock: Clock | None = None,
) -> LatencyStats:
    """Run ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed, and summarize the timings.

    ``device`` (default CPU) chooses the clock when none is given: CUDA events on a CUDA device,
    ``time.perf_counter_ns`` otherwise. ``fn`` should do the whole unit of work (for example one
    batch of generation); its return value is discarded.
    """
    if not callable(fn):
        raise ValueError(f"measure_latency needs a callable, got {type(fn).__name__}")
    _check_count("warmup", warmup, 0)
    _check_count("repeats", repeats, 1)
    dev = _device(device)
    if clock is None:
        clock = CudaEventClock(dev) if dev.type == "cuda" else PerfCounterClock()
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        clock.start()
        fn()
        samples.append(float(clock.stop()))
    method = f"{clock.method}, {warmup} warm-up + {repeats} runs, median; p95 by linear interpolation (numpy 'linear')"
    return _stats(samples, method, str(dev))


def per_sample(stats: LatencyStats, batch_size: int) -> LatencyStats:
    """The same statistics divided by ``batch_size``: milliseconds per sample of a batched call."""
    _check_count("batch_size", batch_size, 1)
    if stats.unit != "ms":
        raise ValueError(f"per_sample expects per-call statistics (unit 'ms'), got unit {stats.unit!r}")
    scale = 1.0 / batch_size
    return replace(
        stats,
        median_ms=stats.median_ms * scale,
        p95_ms=stats.p95_ms * scale,
        mean_ms=stats.mean_ms * scale,
        std_ms=stats.std_ms * scale,
        min_ms=stats.min_ms * scale,
        max_ms=stats.max_ms * scale,
        samples_ms=tuple(v * scale for v in stats.samples_ms),
        unit="ms/sample",
        method=f"{stats.method}; divided by batch size {batch_size}",
    )


def _per_second(stats: LatencyStats, count: int | float, name: str, unit: str) -> Throughput:
    if stats.unit != "ms":
        raise ValueError(f"throughput expects per-call statistics (unit 'ms'), got unit {stats.unit!r}")
    if isinstance(count, bool) or not isinstance(count, int | float) or count <= 0:
        raise ValueError(f"{name} must be a positive number, got {count!r}")
    if stats.median_ms <= 0:
        raise ValueError(f"throughput is undefined for a median latency of {stats.median_ms} ms")
    return Throughput(
        value=count / (stats.median_ms / 1000.0),
        unit=unit,
        method=f"{name} / median latency ({stats.method})",
    )


def samples_per_second(stats: LatencyStats, batch_size: int) -> Throughput:
    """Samples per second when each timed call processes ``batch_size`` samples."""
    _check_count("batch_size", batch_size, 1)
    return _per_second(stats, batch_size, "batch_size", "samples/s")


def tokens_per_second(stats: LatencyStats, tokens: int | float) -> Throughput:
    """Tokens per second when each timed call produces ``tokens`` tokens (for example batch x new tokens)."""
    return _per_second(stats, tokens, "tokens", "tokens/s")


class VisionTimer:
    """Milliseconds between the first vision layer's input and the last one's output, per call."""

    def __init__(self, loaded: Any) -> None:
        layers = loaded.parts().get("vision") or []
        self.available = bool(layers)
        self.times: list[float] = []
        self._handles = []
        if not layers:
            return
        first, last = layers[0][1], layers[-1][1]
        self._cuda = model_device(loaded.model).type == "cuda"
        self._t0: float | None = None
        self._handles.append(first.register_forward_pre_hook(self._start))
        self._handles.append(last.register_forward_hook(self._stop))

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _start(self, module, args) -> None:
        if self._t0 is None:
            self._t0 = self._now()

    def _stop(self, module, args, output) -> None:
        if self._t0 is not None:
            self.times.append((self._now() - self._t0) * 1000.0)
            self._t0 = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
