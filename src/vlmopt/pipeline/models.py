"""Pipeline stages: building, finetuning and compressing models."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

__all__ = ["build_model", "compress_loaded", "compress_model", "export_model", "finetune_model"]


def build_model(
    source: str, out_dir: str | Path, *, settings: dict[str, Any], tokenizer_table: str | Path | None, seed: int = 0
) -> None:
    """Build (``tiny:<family>``) or fetch a model and save it to ``out_dir`` with its processor."""
    from vlmopt.data import dataset_texts
    from vlmopt.models import load_model

    texts = None
    if tokenizer_table:
        from vlmopt.tasks import task_vocabulary

        table = pd.read_parquet(tokenizer_table)
        # The dataset's own text, and what its tasks add (real_vs_generated: the question and label texts).
        texts = dataset_texts(table) + task_vocabulary(table.columns)
    loaded = load_model(
        source,
        texts=texts,
        seed=seed,
        # What the study leaves out, load_model's defaults decide.
        **{k: settings[k] for k in ("dtype", "image_size", "trust_remote_code") if k in settings},
    )
    loaded.save(out_dir)
    log.info("saved %s (%s, %d parameters) to %s", source, loaded.family, loaded.model.num_parameters(), out_dir)


def finetune_model(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    settings: dict[str, Any],
    train_table: str | Path,
    dataset_root: str | Path,
    checkpoint_dir: str | Path,
    seed: int = 0,
    device: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """Full finetuning of the model in ``model_dir``; resumes from ``checkpoint_dir`` after a kill.

    Trains on ``device`` (:func:`vlmopt.device.resolve_device`: the GPU where there is one). A
    checkpoint is resumed only by a run with the same settings, training table, base model
    (:func:`vlmopt.checkpoints.folder_fingerprint` of ``model_dir``) and ``code`` (the stage's
    code digest, :func:`vlmopt.code_digest.stage_digest`); any other is set aside in
    ``checkpoint_dir`` (:mod:`vlmopt.checkpoints`). ``checkpoint_dir`` is removed, set-aside
    checkpoints included, once the finetuned model is saved.
    """
    from vlmopt.checkpoints import folder_fingerprint
    from vlmopt.data.schema import require_rows
    from vlmopt.device import place
    from vlmopt.finetune.config import FullFinetuneConfig
    from vlmopt.finetune.full import finetune
    from vlmopt.models import load_model

    options = {k: v for k, v in settings.items() if k not in ("method", "dataset")}
    options.setdefault("seed", seed)
    config = FullFinetuneConfig.from_dict(options)
    require_rows(train_table, "finetuning")
    loaded = load_model(model_dir)
    place(loaded.model, device)
    base = folder_fingerprint(model_dir) if Path(model_dir).is_dir() else str(model_dir)
    summary = finetune(
        loaded,
        pd.read_parquet(train_table),
        dataset_root,
        config,
        checkpoint_dir=checkpoint_dir,
        fingerprint_extra={"base_model": base, "code": code},
    )
    loaded.save(out_dir)
    (Path(out_dir) / "finetune.json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    # A run resumed at its last step trains no step, and has no loss to show.
    losses = [f"{x:.3f}" if x is not None else "n/a" for x in (summary["first_loss"], summary["last_loss"])]
    log.info(
        "finetuned %s in %.0f s (steps %d to %d), loss %s -> %s",
        model_dir,
        summary["seconds"],
        summary["resumed_from_step"],
        summary["steps"],
        *losses,
    )
    return summary


def compress_model(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    steps: list[dict[str, Any]],
    data_root: str | Path = "resources/data",
    device: str | None = None,
    work_dir: str | Path | None = None,
    code: str | None = None,
    share: str | Path | None = None,
) -> dict[str, Any]:
    """Apply a variant's compression steps and save the model with its ``manifest.json``.

    Steps with ``calibration: {dataset, split, n, ...}`` calibrate on that split of
    ``data_root/<dataset>``, and ``lora`` steps train on theirs. Runtime steps (dynamic int8) do
    not survive safetensors: the folder holds the weights they start from, the manifest records
    them, and :func:`vlmopt.compress.saved.load_variant` re-applies them. Calibration, GPTQ, AWQ and
    LoRA training run on ``device`` (:func:`vlmopt.device.resolve_device`: the GPU where there is one).

    With ``work_dir``, long steps keep their progress there (:class:`~vlmopt.compress.step.StepWork`),
    so that a killed job resumes them; what they keep is fingerprinted with the base model folder's
    digest, the digests of the split tables the steps read, the steps and ``code`` (the stage's code
    digest). ``work_dir`` is removed once the variant is saved. With ``share`` (a store folder), the
    weight files the variant has in common with others are hard links to one copy there
    (:mod:`vlmopt.compress.sharing`).
    """
    from vlmopt.checkpoints import folder_fingerprint
    from vlmopt.compress import step_datasets
    from vlmopt.compress.step import StepWork
    from vlmopt.data.download import file_digest
    from vlmopt.data.schema import require_rows
    from vlmopt.device import place
    from vlmopt.models import load_model

    # Before the model is loaded: a calibration or training split without rows.
    tables = {}
    for index, step in enumerate(steps):
        for dataset, split in step_datasets(step):
            path = Path(data_root) / dataset / f"{split}.parquet"
            require_rows(path, f"step {index} ({step['method']})")
            tables[f"{dataset}/{split}"] = path
    work = None
    if work_dir is not None:
        inputs = {
            "base_model": folder_fingerprint(model_dir),
            "data": {key: file_digest(path) for key, path in sorted(tables.items())},
            "code": code,
        }
        work = StepWork(Path(work_dir), inputs)
    loaded = load_model(model_dir)
    place(loaded.model, device)
    manifest = compress_loaded(
        loaded, out_dir, steps=steps, data_root=data_root, source=model_dir, work=work, share=share
    )
    if work_dir is not None:
        shutil.rmtree(work_dir, ignore_errors=True)
    return manifest


def compress_loaded(
    loaded: Any,
    out_dir: str | Path,
    *,
    steps: list[dict[str, Any]],
    data_root: str | Path = "resources/data",
    source: str | Path | None = None,
    work: Any = None,
    share: str | Path | None = None,
) -> dict[str, Any]:
    """:func:`compress_model` on a model already in memory, which is changed in place.

    The steps run on the model's device; on return ``loaded`` is the model as
    :func:`~vlmopt.compress.saved.load_variant` reads it back from ``out_dir``, on the CPU (runtime
    steps applied, kept adapters attached). ``source`` is the folder it was loaded from, hashed into the manifest;
    ``work`` (a :class:`~vlmopt.compress.step.StepWork`) is where long steps keep their progress;
    ``share`` the store of weight files shared between variants.
    """
    from vlmopt.compress import TrainingData, apply_variant
    from vlmopt.compress.calibration import Calibration
    from vlmopt.compress.saved import folder_digest, save_variant
    from vlmopt.finetune.full import finetune
    from vlmopt.tables import config_hash
    from vlmopt.tasks.encode import calibration_batches

    def calibration(spec: dict[str, Any]) -> Calibration:
        root = Path(data_root) / spec["dataset"]
        table = pd.read_parquet(root / f"{spec['split']}.parquet")
        batches, description = calibration_batches(
            loaded, table, root, n_samples=spec["n"], batch_size=spec["batch_size"], seed=spec["seed"]
        )
        return Calibration(batches, description)

    def training(spec: dict[str, Any]) -> TrainingData:
        root = Path(data_root) / spec["dataset"]
        return TrainingData(loaded, pd.read_parquet(root / f"{spec['split']}.parquet"), root, fit=finetune)

    manifest = apply_variant(
        loaded.model,
        loaded.parts(),
        steps,
        defer_runtime=True,
        calibration=calibration,
        training=training,
        work=work,
    )
    inputs = {"model": folder_digest(source) if source is not None else None, "steps": steps}
    save_variant(loaded, out_dir, manifest, inputs_hash=config_hash(inputs), share=share)
    return manifest


def export_model(variant_dir: str | Path, out_dir: str | Path) -> bool:
    """Export the packed low-bit folder of a variant (:func:`vlmopt.compress.saved.export_variant`) to
    ``out_dir``; True when it was written. A variant that is not stored packed in full gets
    ``out_dir/NOT_EXPORTED.txt`` saying why, and a warning, so that a study's run goes on."""
    from vlmopt.compress.saved import NotExportable, export_variant

    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        export_variant(variant_dir, out_dir)
    except NotExportable as err:
        log.warning("not exported: %s", err)
        out_dir.mkdir(parents=True)
        (out_dir / "NOT_EXPORTED.txt").write_text(f"{err}\n")
        return False
    return True
