"""Peak memory of a region of code, on the CPU (resident set size) or on a CUDA device (allocator peak).

CPU: a background thread reads this process's resident set size (RSS) about every millisecond
while the region runs, and RSS is also read at the start and at the end; the peak is the largest
reading. An allocation that lives for less than one sampling interval can be missed, and RSS
counts pages touched, not bytes reserved. RSS comes from psutil when it is importable, otherwise
from ``/proc/self/statm`` (Linux).

CUDA: ``torch.cuda.reset_peak_memory_stats(device)`` at the start and
``torch.cuda.max_memory_allocated(device)`` at the end: the peak of memory held by tensors through
PyTorch's caching allocator (not memory reserved by the allocator, nor memory of the CUDA
context or of other libraries). The allocator counts on the host at allocation time, so no
synchronization is needed.

Sizes are in MiB (2**20 bytes), reported under ``*_mb`` names.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

__all__ = ["MemoryStats", "PeakMemory", "measure_peak_memory", "rss_bytes"]

MIB = 2**20


@dataclass(frozen=True)
class MemoryStats:
    """Peak memory of a region: ``peak_mb`` during it, ``baseline_mb`` at its start, and their difference."""

    peak_mb: float
    baseline_mb: float
    peak_delta_mb: float
    method: str
    device: str
    unit: str = "MiB"
    n_samples: int = 0


def _rss_reader() -> tuple[Callable[[], int], str]:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        process = psutil.Process(os.getpid())
        return (lambda: int(process.memory_info().rss)), "psutil"
    page = os.sysconf("SC_PAGE_SIZE")

    def statm() -> int:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * page

    return statm, "/proc/self/statm"


def rss_bytes() -> int:
    """This process's resident set size in bytes."""
    read, _ = _rss_reader()
    return read()


class PeakMemory:
    """Context manager measuring peak memory of its body on ``device`` (default CPU).

    After the ``with`` block, :attr:`result` holds a :class:`MemoryStats`. On the CPU
    ``interval_s`` sets how often the sampling thread reads RSS (default 1 ms).
    """

    def __init__(self, device: str | torch.device | None = None, *, interval_s: float = 0.001) -> None:
        self.device = torch.device("cpu") if device is None else torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"PeakMemory supports cpu and cuda devices, got {self.device}")
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = float(interval_s)
        self._result: MemoryStats | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._baseline = 0
        self._peak = 0
        self._n = 0
        self._read: Callable[[], int] | None = None
        self._source = ""

    @property
    def result(self) -> MemoryStats:
        if self._result is None:
            raise RuntimeError("PeakMemory.result is available only after the with block has ended")
        return self._result

    # CPU: RSS sampled by a daemon thread.
    def _sample(self) -> None:
        assert self._read is not None
        while not self._stop.wait(self.interval_s):
            value = self._read()
            self._n += 1
            if value > self._peak:
                self._peak = value

    def _start_cpu(self) -> None:
        self._read, self._source = _rss_reader()
        self._baseline = self._peak = self._read()
        self._n = 1
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="vlmopt-peak-rss", daemon=True)
        self._thread.start()

    def _stop_cpu(self) -> MemoryStats:
        assert self._read is not None and self._thread is not None
        self._stop.set()
        self._thread.join()
        final = self._read()
        peak = max(self._peak, final)
        interval_ms = self.interval_s * 1000
        return MemoryStats(
            peak_mb=peak / MIB,
            baseline_mb=self._baseline / MIB,
            peak_delta_mb=(peak - self._baseline) / MIB,
            method=f"RSS sampled every {interval_ms:g} ms ({self._source})",
            device=str(self.device),
            n_samples=self._n + 1,
        )

    # CUDA: the caching allocator's own peak counter.
    def _start_cuda(self) -> None:
        try:
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = int(torch.cuda.memory_allocated(self.device))
        except (RuntimeError, AssertionError) as exc:
            raise RuntimeError(f"PeakMemory({self.device}): CUDA memory statistics are unavailable: {exc}") from exc

    def _stop_cuda(self) -> MemoryStats:
        peak = int(torch.cuda.max_memory_allocated(self.device))
        return MemoryStats(
            peak_mb=peak / MIB,
            baseline_mb=self._baseline / MIB,
            peak_delta_mb=(peak - self._baseline) / MIB,
            method="torch.cuda.max_memory_allocated",
            device=str(self.device),
        )

    def __enter__(self) -> PeakMemory:
        self._result = None
        if self.device.type == "cuda":
            self._start_cuda()
        else:
            self._start_cpu()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._result = self._stop_cuda() if self.device.type == "cuda" else self._stop_cpu()


def measure_peak_memory(fn: Callable[[], Any], device: str | torch.device | None = None) -> MemoryStats:
    """Peak memory while ``fn()`` runs once on ``device`` (see :class:`PeakMemory`)."""
    with PeakMemory(device) as meter:
        fn()
    return meter.result
