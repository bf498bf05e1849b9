"""Time GPTQ on one 4096 x 4096 linear layer with 2,048 calibration tokens on CPU.

The size of an OPT-6.7B / LLaMA-7B attention projection. Quantizes to 4 bits, groups of 128,
with act-order off, on, and on with static groups, and prints the wall time of
:func:`gptq_quantize_weight` (Hessian included, fastest of ``--repeat`` runs), of the Hessian
alone, and the relative output error next to round-to-nearest.
Usage: ``python benchmarks/gptq_layer.py [--threads 2] [--repeat 3]`` from the repository root.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from vlmopt.compress.gptq import HessianAccumulator, gptq_quantize_weight
from vlmopt.compress.quant import rtn_quantize_weight

D, TOKENS, RANK = 4096, 2048, 256


def layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(D, D, generator=g) / D**0.5
    x = torch.randn(TOKENS, RANK, generator=g) @ (torch.randn(RANK, D, generator=g) / RANK**0.5)
    x += 0.1 * torch.randn(TOKENS, D, generator=g)
    x[:, torch.randperm(D, generator=g)[:32]] *= 20  # outlier channels
    return weight, x


def rel_error(w_q: torch.Tensor, ref: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ w_q.T - ref).norm() / ref.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs per setting; the table shows the fastest")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weight, x = layer()
    ref = x @ weight.T
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, {platform.processor() or '?'}")
    print(f"layer {D} x {D}, {TOKENS} tokens, 4-bit, group 128")

    start = time.perf_counter()
    acc = HessianAccumulator(D)
    acc.add(x)
    acc.hessian()
    hessian_s = time.perf_counter() - start
    rtn = rel_error(rtn_quantize_weight(weight, bits=4, group_size=128), ref, x)

    rows = [("RTN", "-", rtn)]
    configs = (("GPTQ", False, False), ("GPTQ act-order", True, False), ("GPTQ act+static", True, True))
    for label, act_order, static in configs:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            w_q = gptq_quantize_weight(weight, x, bits=4, group_size=128, act_order=act_order, static_groups=static)
            times.append(time.perf_counter() - start)
        rows.append((label, f"{min(times):.1f}", rel_error(w_q, ref, x)))

    print(f"Hessian 2/n X^T X alone: {hessian_s:.2f} s; fastest of {args.repeat} runs; load {os.getloadavg()}")
    print(f"| {'method':<16} | {'time (s)':>8} | {'rel. output error':>17} |")
    print(f"|{'-' * 18}|{'-' * 9}:|{'-' * 18}:|")
    for label, seconds, err in rows:
        print(f"| {label:<16} | {seconds:>8} | {err:>17.4f} |")


if __name__ == "__main__":
    main()
