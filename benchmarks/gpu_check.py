"""One offline check of vlmopt on a GPU: generation speed, the profile's rows, quantization time, batch agreement.

Builds BLIP-2 with OPT-2.7B's layer sizes (3.7 billion parameters, random weights in bfloat16;
no download: timings and memory are the real model's, its captions are not) and reports, as JSON:

1. ``generation``: new tokens/s of greedy captioning (exactly ``--tokens`` new tokens) at each
   ``--batches`` size, with the dynamic and the static KV cache (:func:`vlmopt.infer.cache_kwargs`);
2. ``profile``: the rows :func:`vlmopt.profiling.variant.profile_variant` writes for the model
   (latency, decode time per token, peak memory, gross and net energy, idle power, roofline);
3. ``quantization``: seconds to quantize the whole language model to 4 bits in groups of 128 with
   round-to-nearest and with GPTQ (``--gptq-samples`` calibration images);
4. ``agreement``: the share of ``--agreement-images`` greedy captions that are the same token for
   token when generated one image at a time and all in one batch. In bfloat16 a batch runs other
   matrix-product kernels (other reduction orders) than a single row, logits move by about one
   bfloat16 step, and a random-init model's near-flat next-token distributions turn such moves into
   other tokens: agreement well below 1 is expected here and says nothing of a trained model. The
   same comparison in float32 on the CPU is exact (tests/test_infer.py).

``--size tiny`` runs the same steps on the test suite's tiny BLIP-2 (float32), to check the script
on a CPU. Usage::

    python benchmarks/gpu_check.py --size real --device cuda --out gpu_check.json
    python benchmarks/gpu_check.py --size tiny --device cpu --batches 1 8 --tokens 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader_throughput import CAPTIONS, real_size_blip2, write_images  # noqa: E402

from vlmopt.compress import apply_variant  # noqa: E402
from vlmopt.compress.calibration import Calibration  # noqa: E402
from vlmopt.data.images import open_image  # noqa: E402
from vlmopt.infer import cache_kwargs  # noqa: E402
from vlmopt.models import load_model  # noqa: E402
from vlmopt.profiling.variant import profile_variant  # noqa: E402
from vlmopt.tasks.encode import calibration_batches  # noqa: E402

RTN = {"method": "uniform", "bits": 4, "part": "language", "granularity": "group", "group_size": 128}
GPTQ = {"method": "gptq", "bits": 4, "part": "language", "group_size": 128, "symmetric": True}
PROFILE_MEASURES = (
    "latency_ms_p50",
    "prefill_ms_p50",
    "decode_ms_per_token_p50",
    "throughput_tokens_per_s",
    "peak_mem_mb",
    "energy_j_per_sample",
    "energy_gross_j_per_sample",
    "idle_power_w",
    "decode_weight_bytes_per_step",
    "decode_bandwidth_gb_s",
    "decode_bandwidth_fraction",
    "prefill_tflops",
    "prefill_compute_fraction",
    "gflops_per_token_per_sample",
)


def build(size: str, device: str) -> Any:
    if size == "real":
        return real_size_blip2(device)
    loaded = load_model("tiny:blip2-opt", texts=CAPTIONS)
    loaded.model.to(device)
    return loaded


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generation_rates(loaded: Any, images: list, args: argparse.Namespace) -> list[dict[str, Any]]:
    device = next(loaded.model.parameters()).device
    prompt = loaded.adapter.prompt("captioning")
    greedy = {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens, "num_beams": 1, "do_sample": False}
    out = []
    for cache in ("dynamic", "static"):
        extra = cache_kwargs(loaded, cache)
        if cache == "static" and not extra:
            continue
        for batch in args.batches:
            chosen = [images[i % len(images)] for i in range(batch)]
            encoded = loaded.adapter.encode(loaded, chosen, [prompt] * batch)
            encoded.inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in encoded.inputs.items()}
            loaded.adapter.generate(loaded, encoded, **greedy, **extra)  # warm-up (compilation, allocation)
            times = []
            for _ in range(args.repeats):
                sync(device)
                start = time.perf_counter()
                with torch.inference_mode():
                    loaded.adapter.generate(loaded, encoded, **greedy, **extra)
                sync(device)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            rate = batch * args.tokens / seconds
            out.append({"cache": cache, "batch": batch, "seconds": seconds, "tokens_per_s": rate})
            print(f"generation: {cache:7s} batch {batch:3d}: {out[-1]['tokens_per_s']:.1f} new tokens/s", flush=True)
    return out


def agreement(loaded: Any, images: list, args: argparse.Namespace) -> dict[str, Any]:
    device = next(loaded.model.parameters()).device
    prompt = loaded.adapter.prompt("captioning")
    greedy = {"max_new_tokens": args.tokens, "num_beams": 1, "do_sample": False}
    chosen = images[: args.agreement_images]

    def captions(batch: list) -> list[str]:
        encoded = loaded.adapter.encode(loaded, batch, [prompt] * len(batch))
        encoded.inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in encoded.inputs.items()}
        with torch.inference_mode():
            return loaded.adapter.generate(loaded, encoded, **greedy)

    one = [captions([image])[0] for image in chosen]
    together = captions(chosen)
    same = sum(a == b for a, b in zip(one, together, strict=True))
    return {"images": len(chosen), "same": same, "share": same / len(chosen)}


def quantization_times(args: argparse.Namespace, table: pd.DataFrame, root: Path) -> dict[str, Any]:
    out = {}
    for name, step in (("rtn", RTN), ("gptq", GPTQ)):
        loaded = build(args.size, args.device)  # a fresh model: each method starts from the same weights
        calibration = None
        if step["method"] == "gptq":
            batches, description = calibration_batches(
                loaded, table, root, n_samples=args.gptq_samples, batch_size=8, seed=0
            )
            calibration = Calibration(batches, description)
        device = next(loaded.model.parameters()).device
        sync(device)
        start = time.perf_counter()
        apply_variant(loaded.model, loaded.parts(), [step], calibration=calibration)
        sync(device)
        out[name] = {"seconds": time.perf_counter() - start, "step": step}
        if device.type == "cuda":
            out[name]["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            torch.cuda.reset_peak_memory_stats(device)
        print(f"quantization: {name}: {out[name]['seconds']:.1f} s", flush=True)
        del loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--agreement-images", type=int, default=16)
    parser.add_argument("--gptq-samples", type=int, default=64)
    parser.add_argument("--skip-quantization", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the results here (JSON)")
    args = parser.parse_args()

    import transformers

    results: dict[str, Any] = {
        "size": args.size,
        "device": args.device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if torch.device(args.device).type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
        try:
            import pynvml

            pynvml.nvmlInit()
            results["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as exc:  # noqa: BLE001 - the driver version is informative only
            results["driver"] = f"unknown ({exc})"
    loaded = build(args.size, args.device)
    results["parameters"] = sum(p.numel() for p in loaded.model.parameters())
    with tempfile.TemporaryDirectory(prefix="vlmopt-gpu-check-") as tmp:
        root = Path(tmp)
        n = max(args.agreement_images, max(args.batches), args.gptq_samples, 8)
        table = write_images(root, n)
        images = [open_image(root, rel) for rel in table["image"]]
        results["generation"] = generation_rates(loaded, images, args)
        profile = profile_variant(
            loaded,
            table,
            root,
            "captioning",
            settings={"batch_size": min(8, n), "warmup": 2, "repeats": args.repeats},
            generation={"max_new_tokens": args.tokens},
            sizes=False,
        ).set_index("measure")
        results["profile"] = {
            m: {"value": profile.loc[m, "value"], "unit": profile.loc[m, "unit"], "note": profile.loc[m, "note"]}
            for m in PROFILE_MEASURES
            if m in profile.index
        }
        print("profile:", json.dumps({m: r["value"] for m, r in results["profile"].items()}), flush=True)
        results["agreement"] = agreement(loaded, images, args)
        print("agreement:", results["agreement"], flush=True)
        del loaded
        if not args.skip_quantization:
            results["quantization"] = quantization_times(args, table, root)
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
