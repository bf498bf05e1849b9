"""CPU latency of one transformer MLP at a real model's width: dense, SVD-factorized, dynamic int8.

The tiny models of the default study are too small for structural methods to show their effect
on latency (per-call overhead dominates matrices of 32-128 columns). This script builds one
OPT-style MLP block at ``--width`` (default 1024, OPT-350M; ``fc1`` to 4x the width and back),
applies each variant through :func:`vlmopt.compress.apply_variant` exactly as a study would,
and times a forward pass over ``--tokens`` tokens (median of ``--repeat`` runs after a warm-up).
It also prints the relative output error against the dense block on the same inputs.

Usage: ``python benchmarks/mlp_latency.py [--width 1024] [--tokens 256] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from torch import nn

from vlmopt.compress import apply_variant

VARIANTS = {
    "dense": [],
    "svd ratio 0.5": [{"method": "svd", "ratio": 0.5, "part": "language"}],
    "svd ratio 0.25": [{"method": "svd", "ratio": 0.25, "part": "language"}],
    "dynamic int8 (fbgemm)": [{"method": "dynamic_int8", "part": "language", "backend": "fbgemm"}],
    "dynamic int8 (torchao)": [{"method": "dynamic_int8", "part": "language"}],
}


class MLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = MLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class Model(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer(width)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = Model(args.width).eval()
    x = torch.randn(1, args.tokens, args.width)
    with torch.inference_mode():
        reference = dense(x)
    print(
        f"# {platform.machine()}, torch {torch.__version__}, {args.threads} threads, width {args.width}, "
        f"{args.tokens} tokens"
    )
    print("| variant | parameters | ms / forward | rel. output error |")
    print("|---|---:|---:|---:|")
    for name, steps in VARIANTS.items():
        model = copy.deepcopy(dense)
        apply_variant(model, {"language": [("layers.0", model.layers[0])]}, steps)
        params = sum(p.numel() for p in model.parameters())
        with torch.inference_mode():
            out = model(x)
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
        error = float((out - reference).norm() / (reference - x).norm())
        print(f"| {name} | {params:,} | {1000 * statistics.median(times):.1f} | {error:.4f} |")


if __name__ == "__main__":
    main()
