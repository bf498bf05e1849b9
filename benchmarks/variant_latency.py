"""CPU latency and parameter count of the compressed models of a study, at a fixed output length.

Loads every variant folder under ``results/models/<model>/<ft>/`` (as inference does, with
:func:`vlmopt.compress.saved.load_variant`), and times greedy captioning of ``--samples`` test images
in batches of ``--batch-size`` with exactly ``--tokens`` new tokens per sample
(``min_new_tokens = max_new_tokens``), so that a variant which writes shorter captions does not
look faster. Prints the median over ``--repeat`` runs (after one warm-up run) in milliseconds
per sample, next to the parameter count and the manifest's representation.

Usage, after ``make demo``: ``python benchmarks/variant_latency.py --model blip-tiny`` from the
repository root.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from vlmopt.compress.saved import load_variant
from vlmopt.data.images import open_image
from vlmopt.tasks import get_task


def time_variant(folder: Path, images: list, *, batch_size: int, tokens: int, repeat: int) -> tuple[float, int]:
    loaded = load_variant(folder)
    prompt = get_task("captioning").prompts(pd.DataFrame({"image": [""]}), loaded.adapter)[0]
    batches = [images[s : s + batch_size] for s in range(0, len(images), batch_size)]
    encoded = [loaded.adapter.encode(loaded, batch, [prompt] * len(batch)) for batch in batches]
    settings = {"max_new_tokens": tokens, "min_new_tokens": tokens, "num_beams": 1, "do_sample": False}

    def run() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for enc in encoded:
                loaded.adapter.generate(loaded, enc, **settings)
        return time.perf_counter() - start

    run()  # warm-up
    seconds = statistics.median(run() for _ in range(repeat))
    return 1000 * seconds / len(images), sum(p.numel() for p in loaded.model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results")
    parser.add_argument("--data", default="resources/data/shapes")
    parser.add_argument("--model", default="blip-tiny")
    parser.add_argument("--ft", default="full")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    test = pd.read_parquet(Path(args.data) / "test.parquet").head(args.samples)
    images = [open_image(args.data, rel) for rel in test["image"]]
    root = Path(args.results) / "models" / args.model / args.ft
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)")
    print("| variant | representation | parameters | ms / sample |")
    print("|---|---|---:|---:|")
    for folder in sorted(p for p in root.iterdir() if (p / "manifest.json").is_file()):
        representation = json.loads((folder / "manifest.json").read_text())["representation"]
        ms, params = time_variant(folder, images, batch_size=args.batch_size, tokens=args.tokens, repeat=args.repeat)
        print(f"| {folder.name} | {representation} | {params:,} | {ms:.2f} |")


if __name__ == "__main__":
    main()
