"""What the profiling primitives add to the time of the code they measure, on the CPU.

The measured call is one forward pass of a small MLP (``--width`` 512 -> 4x -> 512, ReLU) over a
batch of ``--batch`` rows (default 32), without autograd. Each setting times that call with
:func:`vlmopt.profiling.measure_latency`:

- ``alone``: the call by itself.
- ``inside PeakMemory``: all timed calls run inside one :class:`PeakMemory` region, so the RSS
  sampling thread (1 ms) competes with the call for the CPU.
- ``PeakMemory per call``: each call is its own region (thread start, first and last RSS reads).
- ``EnergyMeter per call``: each call is its own region, no idle measurement (``idle_s=0``).
  Where RAPL/NVML is unavailable this is the cost of finding that out; the reason is printed.
- ``FlopCounterMode per call``: each call runs under :func:`count_flops`.

Settings take turns in short blocks (``--repeats`` timed calls each) over ``--rounds`` rounds, so
that a change in the machine's load affects all of them alike. The median and p95 pool every
round; the added time is the median over rounds of the setting's median minus the median of
``alone`` in the same round.

Usage: ``python benchmarks/profiler_overhead.py [--threads 1] [--rounds 60] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from vlmopt.profiling import EnergyMeter, PeakMemory, count_flops, measure_latency


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build_mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, 4 * width), nn.ReLU(), nn.Linear(4 * width, width)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = build_mlp(args.width)
    x = torch.randn(args.batch, args.width)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def with_peak_memory() -> None:
        with PeakMemory():
            forward()

    def with_energy() -> None:
        with EnergyMeter(idle_s=0):
            forward()

    def with_flops() -> None:
        count_flops(forward)

    def block(fn: Callable[[], None]) -> Callable[[], list[float]]:
        return lambda: list(measure_latency(fn, warmup=args.warmup, repeats=args.repeats).samples_ms)

    def block_inside_one_region() -> list[float]:
        with PeakMemory():
            return block(forward)()

    settings: dict[str, Callable[[], list[float]]] = {
        "alone": block(forward),
        "inside PeakMemory (sampler running)": block_inside_one_region,
        "PeakMemory per call": block(with_peak_memory),
        "EnergyMeter per call (idle_s=0)": block(with_energy),
        "FlopCounterMode per call": block(with_flops),
    }
    samples: dict[str, list[float]] = {name: [] for name in settings}
    differences: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        medians = {}
        for name, run in settings.items():
            values = run()
            samples[name].extend(values)
            medians[name] = float(np.median(values))
        for name in settings:
            differences[name].append(medians[name] - medians["alone"])

    flops = count_flops(forward).total_flops
    with EnergyMeter(idle_s=0) as meter:
        forward()
    energy = meter.result

    print(
        f"MLP {args.width} -> {4 * args.width} -> {args.width}, batch {args.batch}, {flops / 1e6:.1f} MFLOP per call; "
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs ({cpu_model()})"
    )
    print(
        f"{args.rounds} rounds; per round and setting {args.warmup} warm-up + {args.repeats} timed calls; "
        "added time = median over rounds of (setting median - alone median) in the same round\n"
    )
    base = float(np.median(samples["alone"]))
    print(f"| {'setting':<36} | median ms | p95 ms | added per call (median of rounds) |")
    print(f"|{'-' * 38}|----------:|-------:|----------------------------------:|")
    for name, values in samples.items():
        median = float(np.median(values))
        p95 = float(np.percentile(values, 95))
        extra = float(np.median(differences[name]))
        overhead = "-" if name == "alone" else f"{extra:+.3f} ms ({100 * extra / base:+.0f}%)"
        print(f"| {name:<36} | {median:9.3f} | {p95:6.3f} | {overhead:>33} |")
    if energy.energy_j is None:
        print(f"\nEnergyMeter here: unavailable ({energy.reason}); its row is the cost of finding that out.")
    else:
        print(f"\nEnergyMeter here: {energy.method}")


if __name__ == "__main__":
    main()
