"""Disk taken by the variant folders of a study, computed from its variants on real-size skeletons.

Each study file's variants (its ``variants`` and ``grids``) are planned on its models built on the
meta device with the real layer sizes (no weights, no download: the configurations are written
out below for the S2 studies' hub models), and each variant's folder is sized as
``vlmopt.compress.saved.save_variant`` writes it:

- a Linear quantized by ``uniform``, ``gptq`` or ``awq`` is stored packed when the variant can be
  (:mod:`vlmopt.compress.packed`: one scheme, or several symmetric ones): ``out x ceil(in x bits /
  32)`` int32 words, a scale per row and group in the model's dtype, packed zero points when
  asymmetric; otherwise the whole variant keeps float weights;
- every other tensor is stored in the model's dtype.

Three totals per study: every variant as a float copy (before packed storage), packed but each
folder whole, and as the pipeline stores them: the files of the module groups a variant leaves
unchanged are hard links to one copy shared by every variant (:mod:`vlmopt.compress.sharing`),
counted once for the study.

Assumptions: every AWQ group folds its scales (a group whose fold is refused, such as the
Q-Former's post-norm layers, stays float and makes its variant's folder larger than counted here);
tied weights count once. Usage::

    python benchmarks/study_disk.py config/studies/blip2-quantization*.yaml
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from vlmopt.compress.sharing import group_of
from vlmopt.compress.variant import parse_step
from vlmopt.models import get_family
from vlmopt.study import expand_grids

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
WEIGHT_METHODS = ("uniform", "gptq", "awq")


def _configs() -> dict[str, tuple[str, Any]]:
    """The S2 studies' hub models: family and transformers configuration with the real sizes."""
    from transformers import (
        Blip2Config,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        OPTConfig,
    )

    vision = Blip2VisionConfig()  # ViT-g/14: 39 layers of 1,408, feed-forward 6,144
    opt = OPTConfig(
        vocab_size=50272,
        hidden_size=2560,
        ffn_dim=10240,
        num_hidden_layers=32,
        num_attention_heads=32,
        word_embed_proj_dim=2560,
    )
    blip2 = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=Blip2QFormerConfig(encoder_hidden_size=1408).to_dict(),
        text_config=opt.to_dict(),
        num_query_tokens=32,
    )
    itm = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=Blip2QFormerConfig(encoder_hidden_size=1408, use_qformer_text_input=True).to_dict(),
        num_query_tokens=32,
        image_text_hidden_size=256,
    )
    llava = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ).to_dict(),
        text_config=LlamaConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
        ).to_dict(),
    )
    return {
        "Salesforce/blip2-opt-2.7b": ("blip2-opt", blip2),
        "Salesforce/blip2-itm-vit-g-coco": ("blip2-itm", itm),
        "llava-hf/llava-1.5-7b-hf": ("llava", llava),
    }


def _scheme(config: Any, weight: torch.Tensor) -> tuple[int, bool, str, int | None]:
    """(bits, symmetric, strategy, group size) that a step's config records for a Linear's weight."""
    columns = weight.shape[1]
    if config.method == "uniform":
        strategy = {"per_channel": "channel", "per_tensor": "tensor", "group": "group"}[config.granularity]
        return config.bits, config.symmetric, strategy, config.group_size if strategy == "group" else None
    group = config.group_size
    symmetric = bool(getattr(config, "symmetric", False)) if config.method == "gptq" else False
    if group is None or group > columns:
        return config.bits, symmetric, "channel", None
    return config.bits, symmetric, "group", group


def _packed_bytes(weight: torch.Tensor, scheme: tuple[int, bool, str, int | None], dtype_bytes: int) -> int:
    bits, symmetric, strategy, group = scheme
    rows, columns = weight.shape
    groups = {"tensor": 1, "channel": 1, "group": columns // (group or columns)}[strategy]
    scales = 1 if strategy == "tensor" else rows * groups
    total = rows * math.ceil(columns * bits / 32) * 4 + scales * dtype_bytes + 16
    if not symmetric:
        total += 1 if strategy == "tensor" else math.ceil(rows * bits / 32) * 4 * groups
    return total


def variant_bytes(model: nn.Module, parts: Any, steps: list[dict[str, Any]], dtype_bytes: int) -> dict[str, int]:
    """Bytes of one variant's folder: as floats, as stored now, and with unchanged tensors shared."""
    sizes = {}
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        sizes[name] = p.numel() * dtype_bytes
    dense = sum(sizes.values())
    schemes: dict[str, tuple[tuple[int, bool, str, int | None], torch.Tensor]] = {}
    changed: set[str] = set()
    for step in steps:
        method, config = parse_step(step)
        refs = config.select(model, parts)
        for ref in refs:
            weight_name = f"{ref.name}.weight"
            changed.add(weight_name)
            if config.method in WEIGHT_METHODS:
                schemes[ref.name] = (_scheme(config, ref.module.weight), ref.module.weight)
            else:
                schemes.pop(ref.name, None)
    kinds = {scheme for scheme, _ in schemes.values()}
    packable = len(kinds) == 1 or (len(kinds) > 1 and all(symmetric for _, symmetric, _, _ in kinds))
    stored = dense
    if packable:
        for name, (scheme, weight) in schemes.items():
            stored += _packed_bytes(weight, scheme, dtype_bytes) - sizes[f"{name}.weight"]
    # Files of module groups the variant leaves unchanged are links to the store's copy.
    groups: dict[str, list[str]] = {}
    for name in sizes:
        groups.setdefault(group_of(name), []).append(name)
    unchanged = sum(sum(sizes[n] for n in names) for names in groups.values() if not changed.intersection(names))
    return {"float": dense, "stored": stored, "shared": stored - unchanged}


def study_bytes(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    variants = {**(config.get("variants") or {}), **expand_grids(config)}
    known = _configs()
    totals = {"variants": 0, "float": 0, "stored": 0, "shared": 0, "packed_variants": 0}
    for model in config["models"].values():
        family_name, model_config = known[model["source"]]
        dtype_bytes = DTYPE_BYTES[model.get("dtype", "float32")]
        family = get_family(family_name)
        skeleton = family.skeleton(model_config)
        parts = family.parts(skeleton)
        # The unchanged files' one copy: the base model's.
        totals["shared"] += variant_bytes(skeleton, parts, [], dtype_bytes)["float"]
        for steps in variants.values():
            sizes = variant_bytes(skeleton, parts, steps, dtype_bytes)
            totals["variants"] += 1
            totals["packed_variants"] += sizes["stored"] < sizes["float"]
            for key in ("float", "stored", "shared"):
                totals[key] += sizes[key]
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="+", type=Path)
    args = parser.parse_args()
    grand = {"float": 0, "stored": 0, "shared": 0}
    print("| study | variants | packed | float copies | packed, folders whole | packed, unchanged files shared |")
    print("|---|---:|---:|---:|---:|---:|")
    for path in args.studies:
        t = study_bytes(path)
        for key in grand:
            grand[key] += t[key]
        print(
            f"| {path.name} | {t['variants']:,} | {t['packed_variants']:,} | {t['float'] / 1e12:.2f} TB "
            f"| {t['stored'] / 1e12:.2f} TB | {t['shared'] / 1e12:.2f} TB |"
        )
    print(
        f"| total | | | {grand['float'] / 1e12:.2f} TB | {grand['stored'] / 1e12:.2f} TB "
        f"({grand['stored'] / grand['float']:.2f}x) | {grand['shared'] / 1e12:.2f} TB "
        f"({grand['shared'] / grand['float']:.2f}x) |"
    )


if __name__ == "__main__":
    main()
