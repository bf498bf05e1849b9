"""How far a generative profile is from the hardware's limits: bytes per decode step, bandwidth, FLOP/s.

A decode step of a language model at small batch reads every weight it uses once and does little
arithmetic per byte, so its pace is bounded by memory bandwidth; the prefill is bounded by compute.
:func:`decode_weight_bytes` counts the bytes a decode step reads: generation is run with forward
hooks on every module that holds tensors, once with one new token (the prefill) and once with
``k`` (``k - 1`` decode steps); the modules called more often in the second run are those the
decode steps use, and their parameters and buffers (an ``nn.Embedding`` only for the rows it looks
up, from its output) are counted per call. Packed low-bit modules count their integer and scale buffers, so a 4-bit
variant on a kernel reads about a quarter of the bytes. :func:`device_peaks` gives the device's
peak memory bandwidth and compute: from a table of known GPUs (vendor figures, dense bfloat16),
else measured here (a copy of 256 MiB on a GPU, 64 MiB on a CPU; a square matrix product in the
model's dtype), and says which.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["KNOWN_DEVICES", "DevicePeaks", "decode_weight_bytes", "device_peaks"]

#: Name fragment of ``torch.cuda.get_device_name`` -> (peak memory bandwidth GB/s, dense bf16 TFLOP/s),
#: vendor figures; the first fragment found in the name wins (more specific ones first).
KNOWN_DEVICES: dict[str, tuple[float, float]] = {
    "H200": (4800.0, 989.0),
    "H100 PCIe": (2000.0, 756.0),
    "H100 NVL": (3900.0, 835.0),
    "H100": (3350.0, 989.0),
    "A100-SXM4-80GB": (2039.0, 312.0),
    "A100 80GB PCIe": (1935.0, 312.0),
    "A100": (1555.0, 312.0),
    "L40S": (864.0, 362.0),
    "L40": (864.0, 181.0),
    "A40": (696.0, 150.0),
    "A10": (600.0, 125.0),
    "L4": (300.0, 121.0),
    "V100": (900.0, 125.0),
    "RTX 4090": (1008.0, 165.0),
}


@dataclass(frozen=True)
class DevicePeaks:
    """Peak memory bandwidth (GB/s) and compute (TFLOP/s) of a device, and where they come from."""

    bandwidth_gb_s: float
    tflops: float
    source: str


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@functools.lru_cache(maxsize=8)
def _measured(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    # 256 MiB on a GPU (beyond its L2 cache), 64 MiB on a CPU (beyond most last-level caches).
    elements = (64 if device.type == "cuda" else 16) * 1024 * 1024
    source = torch.empty(elements, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    copy = _timed(lambda: target.copy_(source), device)
    bandwidth = 2 * source.numel() * source.element_size() / copy / 1e9  # read and write
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    product = _timed(lambda: a @ b, device)
    return bandwidth, 2 * n**3 / product / 1e12


def device_peaks(device: torch.device, dtype: torch.dtype = torch.float32) -> DevicePeaks:
    """Peak bandwidth and compute of ``device``: a known GPU's vendor figures, else measured here."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, (bandwidth, tflops) in KNOWN_DEVICES.items():
            if fragment in name:
                return DevicePeaks(bandwidth, tflops, f"vendor figures of the {name} (dense bf16)")
    bandwidth, tflops = _measured(device, dtype)
    return DevicePeaks(
        bandwidth,
        tflops,
        f"measured on this {device.type}: a memory copy, and a square {str(dtype).removeprefix('torch.')} "
        "matrix product",
    )


def _tensor_bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return sum(t.numel() * t.element_size() for t in tensors)


def decode_weight_bytes(model: nn.Module, generate: Callable[[int], Any], new_tokens: int) -> float | None:
    """Bytes of weights one decode step reads: see the module docstring. ``generate(n)`` generates
    exactly ``n`` new tokens for the batch; None if ``new_tokens`` < 2 (no decode step)."""
    if new_tokens < 2:
        return None
    holders = [(name, m) for name, m in model.named_modules() if _tensor_bytes(m)]
    counts: dict[str, int] = {}
    looked_up: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def count(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            counts[name] = counts.get(name, 0) + 1
            if isinstance(_module, nn.Embedding) and isinstance(output, torch.Tensor):
                # The rows looked up, from the output (subclasses take positions or masks as input).
                looked_up[name] = looked_up.get(name, 0) + output.numel() // _module.embedding_dim

        return count

    def run(n: int) -> tuple[dict[str, int], dict[str, int]]:
        counts.clear()
        looked_up.clear()
        handles = [m.register_forward_hook(hook(name)) for name, m in holders]
        try:
            generate(n)
        finally:
            for handle in handles:
                handle.remove()
        return dict(counts), dict(looked_up)

    prefill, prefill_rows = run(1)
    full, full_rows = run(new_tokens)
    steps = new_tokens - 1
    total = 0.0
    for name, module in holders:
        extra = full.get(name, 0) - prefill.get(name, 0)
        if extra <= 0:
            continue
        if isinstance(module, nn.Embedding):
            rows = full_rows.get(name, 0) - prefill_rows.get(name, 0)
            total += rows * module.embedding_dim * module.weight.element_size()
        else:
            total += extra * _tensor_bytes(module)
    return total / steps
