"""Decode speed and weight memory of a 4-bit language model on a low-bit kernel against its dense weights.

Builds an OPT decoder, randomly initialised, quantizes every Linear of its layers to 4 bits
(asymmetric min-max, groups of ``--group``) and replaces each with
:class:`vlmopt.compress.kernels.Int4Linear`, the module the profile stage runs packed variants
with (torch's int4 tinygemm kernel on CUDA, its CPU version on a CPU). Each run generates exactly
``--tokens`` new tokens greedily after a prompt of ``--prompt`` tokens, at each ``--batch``; decode
tokens/s are ``batch x (tokens - 1) / (end to end - prefill)``, medians of ``--repeats`` runs.
Weight memory counts the parameters and buffers of the decoder layers (the embeddings and the
output head stay dense in both).

``--size real`` has OPT-2.7B's sizes (BLIP-2 OPT-2.7B's language model: 32 layers of 2,560,
feed-forward 10,240), in bfloat16 on the GPU: timings and memory are the real model's, its tokens
are not. ``--size small`` (4 layers of 512) checks the script on a CPU.

Usage::

    python benchmarks/kernel_decode.py --size real --device cuda --batch 1 16
    python benchmarks/kernel_decode.py --size small --device cpu --dtype float32 --batch 1 4
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn
from transformers import OPTConfig, OPTForCausalLM

from vlmopt.compress.kernels import Int4Linear, kernel_for

SIZES = {
    "real": {"hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32, "num_attention_heads": 32},
    "small": {"hidden_size": 512, "ffn_dim": 2048, "num_hidden_layers": 4, "num_attention_heads": 8},
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build(size: str, device: torch.device, dtype: torch.dtype) -> OPTForCausalLM:
    sizes = SIZES[size]
    width = sizes["hidden_size"]
    config = OPTConfig(vocab_size=50272, word_embed_proj_dim=width, max_position_embeddings=2048, **sizes)
    torch.manual_seed(0)
    with torch.device(device):
        model = OPTForCausalLM(config).to(dtype)
    return model.eval()


def quantize(model: OPTForCausalLM, group: int) -> int:
    """Replace every Linear of the decoder layers by an Int4Linear (4 bits, asymmetric, groups); returns the count."""
    layers = model.model.decoder.layers
    names = [n for n, m in layers.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        linear = layers.get_submodule(name)
        w = linear.weight.detach().float()
        rows, columns = w.shape
        grouped = w.reshape(rows, columns // group, group)
        low, high = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
        scale = ((high - low) / 15).clamp(min=1e-8)
        zero = torch.round(-low / scale).clamp(0, 15)
        levels = (torch.round(grouped / scale[..., None]) + zero[..., None]).clamp(0, 15).reshape(rows, columns)
        # Int4Linear's weight is (u - 8) * s + m: u = levels (unsigned), m = (8 - zero) * s.
        dtype = linear.weight.dtype
        replacement = Int4Linear(
            levels.to(torch.int64), scale.to(dtype), ((8 - zero) * scale).to(dtype), group, linear.bias
        )
        parent, _, child = name.rpartition(".")
        setattr(layers.get_submodule(parent) if parent else layers, child, replacement)
    return len(names)


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(model: OPTForCausalLM, ids: torch.Tensor, tokens: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=1)
    sync(device)
    return time.perf_counter() - start


def decode_rate(model, batch: int, args, device: torch.device) -> dict[str, float]:
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(4, 50000, (batch, args.prompt), generator=generator).to(device)
    timed(model, ids, args.tokens, device)  # warm-up
    full = statistics.median(timed(model, ids, args.tokens, device) for _ in range(args.repeats))
    prefill = statistics.median(timed(model, ids, 1, device) for _ in range(args.repeats))
    return {
        "batch": batch,
        "end_to_end_s": full,
        "prefill_s": prefill,
        "decode_tokens_per_s": batch * (args.tokens - 1) / (full - prefill),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    scheme = {"type": "int", "num_bits": 4, "strategy": "group", "group_size": args.group, "symmetric": False}
    kernel, why = kernel_for(scheme, device, dtype)
    if kernel is None:
        raise SystemExit(f"no int4 kernel for this setting: {why}")
    results = {"size": args.size, "device": str(device), "dtype": args.dtype, "group": args.group, "kernel": kernel}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    else:
        results["cpu"] = platform.processor() or platform.machine()
        results["threads"] = torch.get_num_threads()
    model = build(args.size, device, dtype)
    layers = model.model.decoder.layers
    results["dense_weight_bytes"] = weight_bytes(layers)
    results["dense"] = [decode_rate(model, b, args, device) for b in args.batch]
    results["linears"] = quantize(model, args.group)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results["int4_weight_bytes"] = weight_bytes(layers)
    results["int4"] = [decode_rate(model, b, args, device) for b in args.batch]
    for dense, low in zip(results["dense"], results["int4"], strict=True):
        low["speedup"] = low["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
    results["weight_ratio"] = results["int4_weight_bytes"] / results["dense_weight_bytes"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
