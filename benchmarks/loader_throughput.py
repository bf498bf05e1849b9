"""Captioning throughput with and without image-reading workers: does generation wait for JPEG decoding?

Writes ``--images`` photo-sized JPEGs (640 x 480, noise over gradients, so that they decode as
slowly as photos do) and captions them with :func:`vlmopt.infer.predict`, once per value of
``--workers`` (0: the images are decoded in the generating process, between batches), after a
warm-up batch. Greedy decoding of exactly ``--tokens`` new tokens per image, so that every run does
the same work.

``--size real`` builds BLIP-2 with OPT-2.7B's layer sizes (ViT-g/14 with 39 layers of 1,408, a
Q-Former of 32 queries, OPT with 32 layers of 2,560: 3.6 billion parameters with the tiny
vocabulary), randomly initialised, in bfloat16 on the GPU: timings and memory are those of the
real model, its captions are not. ``--size tiny`` is the test suite's tiny BLIP-2, to check the script on a CPU.

Usage::

    python benchmarks/loader_throughput.py --size real --device cuda          # on a GPU
    python benchmarks/loader_throughput.py --size tiny --images 64 --workers 0 1   # a CPU check
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from vlmopt.infer import predict
from vlmopt.models import load_model
from vlmopt.models.base import LoadedModel

CAPTIONS = ["a photo of something", "an image of a thing on a table"]


def write_images(folder: Path, n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` 640 x 480 JPEGs (quality 90) in ``folder/images``; their captioning table."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:480, 0:640]
    for i in range(n):
        base = (np.stack([x * 255 / 640, y * 255 / 480, (x + y) * 255 / 1120], axis=-1) + rng.integers(0, 255)) % 256
        pixels = np.clip(base + rng.normal(0, 24, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i:06d}.jpg", quality=90)
    return pd.DataFrame(
        {
            "sample_id": [f"{i:06d}" for i in range(n)],
            "image": [f"images/{i:06d}.jpg" for i in range(n)],
            "references": [CAPTIONS] * n,
        }
    )


def real_size_blip2(device: str) -> LoadedModel:
    """BLIP-2 OPT-2.7B's architecture, random weights in bfloat16 on ``device``; the tiny model's
    word-level tokenizer (vocabulary size set to it) and a 224-pixel image processor."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, OPTConfig
    from transformers.models.blip.image_processing_blip import BlipImageProcessor
    from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig, Blip2VisionConfig

    tiny = load_model("tiny:blip2-opt", texts=CAPTIONS)
    tokenizer = tiny.tokenizer
    text = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=2560,
        ffn_dim=10240,
        num_hidden_layers=32,
        num_attention_heads=32,
        word_embed_proj_dim=2560,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = Blip2Config(
        vision_config=Blip2VisionConfig().to_dict(),
        qformer_config=Blip2QFormerConfig(encoder_hidden_size=1408, vocab_size=len(tokenizer)).to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=32,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Blip2ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 224, "width": 224}),
        tokenizer=tokenizer,
        num_query_tokens=32,
    )
    return LoadedModel(model.eval(), processor, tiny.family, tiny.adapter, source="real-size:blip2-opt-2.7b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["real", "tiny"], default="real")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--out", type=Path, help="also write the results here (JSON)")
    args = parser.parse_args()

    if args.size == "real":
        loaded = real_size_blip2(args.device)
    else:
        loaded = load_model("tiny:blip2-opt", texts=CAPTIONS)
        loaded.model.to(args.device)
    params = sum(p.numel() for p in loaded.model.parameters())
    generate = {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens, "num_beams": 1, "do_sample": False}
    results = []
    with tempfile.TemporaryDirectory(prefix="vlmopt-loader-") as tmp:
        start = time.perf_counter()
        table = write_images(Path(tmp), args.images)
        print(f"{args.images} JPEGs written in {time.perf_counter() - start:.1f} s", flush=True)
        run = {"batch_size": args.batch_size, "generate_kwargs": generate, "progress": False}
        predict(loaded, table.head(args.batch_size), tmp, "captioning", num_workers=0, **run)  # warm-up
        for workers in args.workers:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = predict(loaded, table, tmp, "captioning", num_workers=workers, **run)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            assert out["error"].isna().all(), out["error"].dropna().head()
            results.append(
                {
                    "workers": workers,
                    "seconds": round(seconds, 2),
                    "images_per_s": round(args.images / seconds, 1),
                    "tokens_per_s": round(args.images * args.tokens / seconds, 1),
                }
            )
            print(f"workers {workers}: {args.images / seconds:7.1f} images/s ({seconds:.1f} s)", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    summary = {
        "model": loaded.source,
        "parameters": params,
        "device": device,
        "images": args.images,
        "batch_size": args.batch_size,
        "tokens": args.tokens,
        "runs": results,
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
