"""Efficiency measurements: latency, peak memory, energy and FLOPs.

Each measurement is a small frozen dataclass holding the value(s), the unit and ``method``, a
short description of how the value was measured. A value that cannot be measured on this machine
is None and ``reason`` says why; nothing is estimated in its place.
"""

from __future__ import annotations

from vlmopt.profiling.energy import EnergyMeter, EnergyResult, per_sample_energy
from vlmopt.profiling.flops import (
    FlopCount,
    GenerationFlops,
    count_flops,
    forward_flops,
    generation_flops,
    uncounted_modules,
)
from vlmopt.profiling.latency import (
    Clock,
    CudaEventClock,
    LatencyStats,
    PerfCounterClock,
    Throughput,
    measure_latency,
    per_sample,
    samples_per_second,
    tokens_per_second,
)
from vlmopt.profiling.memory import MemoryStats, PeakMemory, measure_peak_memory, rss_bytes

__all__ = [
    "Clock",
    "CudaEventClock",
    "EnergyMeter",
    "EnergyResult",
    "FlopCount",
    "GenerationFlops",
    "LatencyStats",
    "MemoryStats",
    "PeakMemory",
    "PerfCounterClock",
    "Throughput",
    "count_flops",
    "forward_flops",
    "generation_flops",
    "measure_latency",
    "measure_peak_memory",
    "per_sample",
    "per_sample_energy",
    "rss_bytes",
    "samples_per_second",
    "tokens_per_second",
    "uncounted_modules",
]
