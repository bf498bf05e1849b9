"""Pipeline stages: preparing and labeling datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["prepare_dataset", "label_dataset"]


def prepare_dataset(
    name: str, settings: dict[str, Any], out_dir: str | Path, *, seed: int = 0, raw_dir: str | Path | None = None
) -> None:
    """Create dataset ``name`` under ``out_dir`` as ``{split}.parquet`` tables and an ``images/`` folder.

    ``settings`` is the study's entry for the dataset: its ``source`` (``synthetic`` is the shapes
    dataset, any other value a registered dataset of ``vlmopt.data.DATASETS``) and the source's
    options. Downloads go to ``raw_dir`` (default ``resources/raw/<name>`` beside ``out_dir``'s
    parent), kept between runs so an interrupted one resumes.
    """
    from vlmopt.data import DATASETS, get_dataset
    from vlmopt.data.labeling import LABELED_SOURCE

    source = settings.get("source", "synthetic")
    if source == LABELED_SOURCE:
        raise ValueError(f"dataset {name!r} is labeled from another dataset: label_dataset prepares it")
    if source != "synthetic" and source not in DATASETS:
        raise ValueError(
            f"dataset {name!r}: source {source!r} can be declared in a study, but this version of vlmopt cannot "
            f"prepare it yet (available: synthetic, {', '.join(sorted(k for k in DATASETS if k != 'shapes'))})"
        )
    spec = get_dataset("shapes" if source == "synthetic" else source)
    options = {k: v for k, v in settings.items() if k not in ("source", "templates")}
    if spec.downloads and raw_dir is None:
        raw_dir = Path(out_dir).parent.parent / "raw" / name
    spec.prepare(out_dir, seed=seed, raw_dir=raw_dir, **options)


def label_dataset(
    name: str,
    settings: dict[str, Any],
    source_root: str | Path,
    out_dir: str | Path,
    *,
    captioner_dir: str | Path | None = None,
    device: str | None = None,
) -> None:
    """Label dataset ``settings['dataset']`` (at ``source_root``) for real-vs-generated finetuning.

    With a captioner (``settings['captioner']``: ``model``, ``finetune``, ``reason``,
    ``batch_size``, ``max_new_tokens``, ``num_beams``), the model in ``captioner_dir`` captions
    every image and, unless ``reason`` is false, answers the study's "What details indicate this
    image is (not) AI-generated?" for its label; the texts go into each image's label text (see
    :mod:`vlmopt.data.labeling`). Greedy decoding, so the labels do not depend on batch size.
    The captioner runs on ``device`` (:func:`vlmopt.device.resolve_device`: the GPU where there is one).
    """
    from vlmopt.data import SPLITS
    from vlmopt.data.labeling import CAPTIONER_DEFAULTS, REASON_QUESTIONS, check_real_generated_labels, make_labeled

    captioner = {**CAPTIONER_DEFAULTS, **settings["captioner"]} if settings.get("captioner") else None
    captions: dict[str, str] = {}
    reasons: dict[str, str] = {}
    if captioner:
        if captioner_dir is None:
            raise ValueError(f"dataset {name!r}: a captioner is configured but no captioner model folder was given")
        from vlmopt.device import place
        from vlmopt.infer import INFERENCE_DEFAULTS, generation_settings, predict
        from vlmopt.models import load_model

        loaded = load_model(captioner_dir)
        place(loaded.model, device, model_dir=captioner_dir)
        gen = generation_settings(max_new_tokens=captioner["max_new_tokens"], num_beams=captioner["num_beams"])
        batch_size = captioner["batch_size"]
        max_error_fraction = INFERENCE_DEFAULTS["max_error_fraction"]
        for split in SPLITS:
            df = pd.read_parquet(Path(source_root) / f"{split}.parquet")
            if df.empty:
                continue
            check_real_generated_labels(df, f"dataset {settings.get('dataset')!r} ({split})")
            run = {"batch_size": batch_size, "generate_kwargs": gen, "max_error_fraction": max_error_fraction}
            out = predict(loaded, df, source_root, "captioning", **run)
            captions.update(zip(out["sample_id"], out["prediction"].fillna(""), strict=True))
            if captioner["reason"]:
                questions = df.assign(
                    question=[REASON_QUESTIONS[int(y)] for y in df["label"]],
                    answers=[["-"]] * len(df),
                    answer_type="other",
                )
                out = predict(loaded, questions, source_root, "vqa", **run)
                reasons.update(zip(out["sample_id"], out["prediction"].fillna(""), strict=True))
    make_labeled(out_dir, source_root=source_root, captions=captions, reasons=reasons)
