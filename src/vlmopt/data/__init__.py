"""Datasets: canonical tables (``<root>/<split>.parquet`` + images) and the sources that create them.

``DATASETS`` maps a dataset name to how it is prepared; adding a dataset is one module and one
entry. Nothing here imports torch or model code, so CPU scoring jobs can read tables cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmopt.data.archives import safe_extract
from vlmopt.data.cifar100 import make_cifar100_test
from vlmopt.data.coco import make_coco2017_val
from vlmopt.data.genimage import make_genimage_biggan
from vlmopt.data.imagenet import make_imagenet_val
from vlmopt.data.imagenetv2 import make_imagenetv2
from vlmopt.data.karpathy import make_coco2014_karpathy, make_flickr30k_1k
from vlmopt.data.rsicd import make_rsicd
from vlmopt.data.schema import (
    SPLITS,
    TASK_COLUMNS,
    dataset_texts,
    read_split,
    validate_dataset_table,
    write_table,
)
from vlmopt.data.scienceqa import make_scienceqa
from vlmopt.data.synthetic import make_shapes
from vlmopt.data.vqa_sources import make_gqa_testdev, make_textvqa_val, make_vqav2_val

__all__ = [
    "DATASETS",
    "SPLITS",
    "TASK_COLUMNS",
    "DatasetSource",
    "dataset_texts",
    "get_dataset",
    "make_shapes",
    "read_split",
    "safe_extract",
    "validate_dataset_table",
    "write_table",
]


@dataclass(frozen=True)
class DatasetSource:
    """How one dataset is prepared: the function that writes it, the settings it takes, what it serves."""

    name: str
    #: Kind of source (``synthetic``, later ``hub``/``url``/``local``); a study's ``source`` names it.
    source: str
    #: ``build(root, *, seed, **options) -> {split: table path}``.
    build: Callable[..., dict[str, Path]]
    #: Settings a study may pass to ``build``.
    options: tuple[str, ...]
    tasks: tuple[str, ...]
    splits: tuple[str, ...] = SPLITS
    offline: bool = True
    description: str = ""
    #: Whether ``build`` downloads published files into a raw folder (``raw_dir``) first.
    downloads: bool = False

    def prepare(
        self, root: str | Path, *, seed: int = 0, raw_dir: str | Path | None = None, **settings: Any
    ) -> dict[str, Path]:
        """Write the dataset under ``root``; an unknown setting is an error naming the allowed ones.

        A downloading source keeps its files in ``raw_dir`` (default ``<root>/raw``), where a
        rerun finds them, or the part already received, again.
        """
        unknown = sorted(set(settings) - set(self.options))
        if unknown:
            raise ValueError(f"dataset {self.name!r}: unknown setting(s) {unknown}; allowed: {list(self.options)}")
        if self.downloads:
            settings["raw_dir"] = Path(raw_dir) if raw_dir is not None else Path(root) / "raw"
        return self.build(root, seed=seed, **settings)


DATASETS: dict[str, DatasetSource] = {
    "shapes": DatasetSource(
        name="shapes",
        source="synthetic",
        build=make_shapes,
        options=("n_train", "n_val", "n_test", "image_size", "labels"),
        tasks=("captioning", "vqa", "classification", "retrieval", "real_vs_generated"),
        description=(
            "coloured shapes on a light background; captions, VQA, retrieval, and labels real-vs-generated "
            "(or colour / shape for zero-shot classification)"
        ),
    ),
    "coco2017-val": DatasetSource(
        name="coco2017-val",
        source="coco2017-val",
        build=make_coco2017_val,
        options=("max_samples", "mirror"),
        tasks=("captioning", "retrieval"),
        offline=False,
        downloads=True,
        description="COCO val2017: 5,000 images with about five captions each (test split)",
    ),
    "cifar100-test": DatasetSource(
        name="cifar100-test",
        source="cifar100-test",
        build=make_cifar100_test,
        options=("max_samples", "mirror"),
        tasks=("classification",),
        offline=False,
        downloads=True,
        description="CIFAR-100 test: 10,000 32x32 images of 100 classes (test split)",
    ),
    "genimage-biggan": DatasetSource(
        name="genimage-biggan",
        source="genimage-biggan",
        build=make_genimage_biggan,
        options=("path", "max_samples"),
        tasks=("classification", "real_vs_generated"),
        description="GenImage BigGAN subset from a local copy: real vs generated (train, and val as test)",
    ),
    "imagenet-val": DatasetSource(
        name="imagenet-val",
        source="imagenet-val",
        build=make_imagenet_val,
        options=("path", "max_samples"),
        tasks=("classification",),
        description="ImageNet-1k validation from a local copy: 50,000 images of 1,000 classes (test split)",
    ),
    "vqav2-val": DatasetSource(
        name="vqav2-val",
        source="vqav2-val",
        build=make_vqav2_val,
        options=("max_samples", "mirror"),
        tasks=("vqa",),
        offline=False,
        downloads=True,
        description="VQA v2 val2014: 214,354 questions about COCO images, ten answers each (test split)",
    ),
    "textvqa-val": DatasetSource(
        name="textvqa-val",
        source="textvqa-val",
        build=make_textvqa_val,
        options=("max_samples", "mirror"),
        tasks=("vqa",),
        offline=False,
        downloads=True,
        description="TextVQA 0.5.1 val: 5,000 questions about text in images, ten answers each (test split)",
    ),
    "gqa-testdev": DatasetSource(
        name="gqa-testdev",
        source="gqa-testdev",
        build=make_gqa_testdev,
        options=("max_samples", "mirror"),
        tasks=("vqa",),
        offline=False,
        downloads=True,
        description="GQA balanced test-dev: 12,578 questions, one answer each, typed by structure (test split)",
    ),
    "coco2014-karpathy": DatasetSource(
        name="coco2014-karpathy",
        source="coco2014-karpathy",
        build=make_coco2014_karpathy,
        options=("splits", "max_samples", "mirror"),
        tasks=("captioning", "retrieval"),
        offline=False,
        downloads=True,
        description="COCO 2014 Karpathy split: 5,000 test images, five captions each (test; val/train via 'splits')",
    ),
    "flickr30k-1k": DatasetSource(
        name="flickr30k-1k",
        source="flickr30k-1k",
        build=make_flickr30k_1k,
        options=("path", "max_samples", "mirror"),
        tasks=("captioning", "retrieval"),
        offline=False,
        downloads=True,
        description="Flickr30k Karpathy test split: 1,000 local images, five downloaded captions each (test split)",
    ),
    "imagenetv2": DatasetSource(
        name="imagenetv2",
        source="imagenetv2",
        build=make_imagenetv2,
        options=("classes", "max_samples", "mirror"),
        tasks=("classification",),
        offline=False,
        downloads=True,
        description="ImageNetV2 matched-frequency: 10,000 new images of the 1,000 ImageNet classes (test split)",
    ),
    "rsicd": DatasetSource(
        name="rsicd",
        source="rsicd",
        build=make_rsicd,
        options=("hub_id", "max_samples"),
        tasks=("captioning", "retrieval"),
        offline=False,
        description="RSICD from the Hugging Face hub: 8,734 train / 1,094 val / 1,093 test remote-sensing images, "
        "five captions each",
    ),
    "scienceqa": DatasetSource(
        name="scienceqa",
        source="scienceqa",
        build=make_scienceqa,
        options=("hub_id", "max_samples"),
        tasks=("vqa",),
        offline=False,
        description="ScienceQA from the Hugging Face hub, multiple-choice questions with an image: 6,218 train / "
        "2,097 val / 2,017 test",
    ),
}


def get_dataset(name: str) -> DatasetSource:
    """The registered dataset ``name``; an unknown name lists the known ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {sorted(DATASETS)}")
    return DATASETS[name]
