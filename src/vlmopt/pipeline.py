"""Stage functions: one call per pipeline stage, shared by the Snakemake scripts and the CLI.

Each function takes paths and plain settings (what a rule passes through ``params:``), does one
stage's work through the library, and writes its outputs atomically where they are single files.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from vlmopt.tables import merge_shards, read_predictions, score_rows, summarise, write_parquet, write_predictions

__all__ = [
    "build_model",
    "build_plots",
    "build_tables",
    "compress_model",
    "finetune_model",
    "gather_predictions",
    "label_dataset",
    "predict_shard",
    "prepare_dataset",
    "profile_variant",
    "score_predictions",
    "start_job",
]

log = logging.getLogger(__name__)


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
) -> dict[str, Any]:
    """Full finetuning of the model in ``model_dir``; resumes from ``checkpoint_dir`` after a kill.

    Trains on ``device`` (:func:`vlmopt.device.resolve_device`: the GPU where there is one).
    """
    from vlmopt.device import place
    from vlmopt.finetune.config import FullFinetuneConfig
    from vlmopt.finetune.full import finetune
    from vlmopt.models import load_model

    options = {k: v for k, v in settings.items() if k not in ("method", "dataset")}
    options.setdefault("seed", seed)
    config = FullFinetuneConfig.from_dict(options)
    loaded = load_model(model_dir)
    place(loaded.model, device)
    summary = finetune(loaded, pd.read_parquet(train_table), dataset_root, config, checkpoint_dir=checkpoint_dir)
    loaded.save(out_dir)
    (Path(out_dir) / "finetune.json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    log.info(
        "finetuned %s in %.0f s, loss %.3f -> %.3f",
        model_dir,
        summary["seconds"],
        summary["first_loss"],
        summary["last_loss"],
    )
    return summary


def compress_model(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    steps: list[dict[str, Any]],
    data_root: str | Path = "resources/data",
    device: str | None = None,
) -> dict[str, Any]:
    """Apply a variant's compression steps and save the model with its ``manifest.json``.

    Steps with ``calibration: {dataset, split, n, ...}`` calibrate on that split of
    ``data_root/<dataset>``, and ``lora`` steps train on theirs. Runtime steps (dynamic int8) do
    not survive safetensors: the folder holds the weights they start from, the manifest records
    them, and :func:`vlmopt.compress.saved.load_variant` re-applies them. Calibration, GPTQ, AWQ and
    LoRA training run on ``device`` (:func:`vlmopt.device.resolve_device`: the GPU where there is one).
    """
    from vlmopt.device import place
    from vlmopt.models import load_model

    loaded = load_model(model_dir)
    place(loaded.model, device)
    return compress_loaded(loaded, out_dir, steps=steps, data_root=data_root, source=model_dir)


def compress_loaded(
    loaded: Any,
    out_dir: str | Path,
    *,
    steps: list[dict[str, Any]],
    data_root: str | Path = "resources/data",
    source: str | Path | None = None,
) -> dict[str, Any]:
    """:func:`compress_model` on a model already in memory, which is changed in place.

    The steps run on the model's device; on return ``loaded`` is the model as
    :func:`~vlmopt.compress.saved.load_variant` reads it back from ``out_dir``, on the CPU (runtime
    steps applied, kept adapters attached). ``source`` is the folder it was loaded from, hashed into the manifest.
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
        loaded.model, loaded.parts(), steps, defer_runtime=True, calibration=calibration, training=training
    )
    inputs = {"model": folder_digest(source) if source is not None else None, "steps": steps}
    save_variant(loaded, out_dir, manifest, inputs_hash=config_hash(inputs))
    return manifest


def _parse_scatteritem(item: str) -> tuple[int, int]:
    """'2-of-3' -> (1, 3): 0-based shard and shard count."""
    try:
        i, n = item.split("-of-")
        shard, n_shards = int(i) - 1, int(n)
    except ValueError as exc:
        raise ValueError(f"shard name {item!r} is not of the form '<i>-of-<n>'") from exc
    return shard, n_shards


def predict_shard(
    model_dir: str | Path,
    table: str | Path,
    dataset_root: str | Path,
    out: str | Path,
    *,
    task: str,
    shard: str,
    settings: dict[str, Any],
    task_settings: dict[str, Any] | None = None,
    device: str | None = None,
) -> None:
    """Predict one shard (``'i-of-n'``) of a dataset split for ``task`` and write it as Parquet.

    ``task_settings`` are the similarity tasks' own (``templates`` for classification, ``k`` for
    retrieval re-ranking); they are recorded in the file's metadata like the generation settings.
    Launched by torchrun (``WORLD_SIZE`` > 1), the processes split the shard's rows and write the
    same file together (:mod:`vlmopt.distributed`), each on its own GPU. A single process runs on
    ``device`` (:func:`vlmopt.device.resolve_device`: the GPU where there is one; the CPU for a
    variant with runtime steps such as dynamic int8).
    """
    from vlmopt import distributed
    from vlmopt.compress.saved import load_variant
    from vlmopt.device import place
    from vlmopt.infer import INFERENCE_DEFAULTS, generate_kwargs, predict

    shard_index, n_shards = _parse_scatteritem(shard)
    gen = generate_kwargs(settings)
    if distributed.launched():
        # One of torchrun's processes: the ranks split the shard's rows and rank 0 writes ``out``.
        distributed.predict_shard(
            model_dir,
            table,
            dataset_root,
            out,
            task=task,
            shard=(shard_index, n_shards),
            batch_size=settings["batch_size"],
            generate_kwargs=gen,
            max_error_fraction=settings.get("max_error_fraction", INFERENCE_DEFAULTS["max_error_fraction"]),
            task_settings=task_settings,
            device=device,
        )
        return
    loaded = load_variant(model_dir)
    place(loaded.model, device, model_dir=model_dir)
    df = predict(
        loaded,
        pd.read_parquet(table),
        dataset_root,
        task,
        batch_size=settings["batch_size"],
        generate_kwargs=gen,
        shard=shard_index,
        n_shards=n_shards,
        max_error_fraction=settings.get("max_error_fraction", INFERENCE_DEFAULTS["max_error_fraction"]),
        task_settings=task_settings,
    )
    meta = {"generation": gen, "task": task, "family": loaded.family, "prompt": loaded.adapter.prompts[task]}
    if task_settings:
        meta["task_settings"] = task_settings
    write_predictions(df, out, meta)


def profile_variant(
    model_dir: str | Path,
    tasks: dict[str, dict[str, Any]],
    out: str | Path,
    *,
    keys: dict[str, str],
    settings: dict[str, Any],
    chain: Any = None,
    device: str | None = None,
    point: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Efficiency rows of one variant on each of its tasks (:mod:`vlmopt.profiling.variant`), as Parquet.

    ``tasks`` maps a task to ``table`` (its split table), ``root`` (the folder its image paths are
    relative to), ``dataset`` (its name) and ``generation`` (max_new_tokens, num_beams ...).
    ``keys`` are model, ft and variant; ``chain`` the settings hashed into ``config_hash`` with
    ``settings``. Runs on ``device`` (the GPU where there is one; the CPU for dynamic int8 variants).
    ``point`` (``{axis, value}``) measures one sweep point instead (:mod:`vlmopt.profiling.sweep`):
    the rows carry ``sweep_axis`` and ``sweep_value`` and no size rows.
    """
    from vlmopt.compress.saved import load_variant, read_manifest
    from vlmopt.device import place
    from vlmopt.infer import generate_kwargs
    from vlmopt.profiling.sweep import SweepPoint, apply_point, compiled_graphs, sweep_rows
    from vlmopt.profiling.variant import DEFAULTS, not_measured
    from vlmopt.profiling.variant import profile_variant as measure
    from vlmopt.tables import EFFICIENCY_SCHEMA, efficiency_rows

    if not tasks:
        raise ValueError(f"nothing to profile for {model_dir}: no tasks given")
    sweep = SweepPoint(point["axis"], point["value"]) if point is not None else None
    loaded = load_variant(model_dir)
    where = place(loaded.model, device, model_dir=model_dir)
    manifest = read_manifest(model_dir)
    settings = {**DEFAULTS, **settings}
    applied = None
    if sweep is not None:
        applied = apply_point(loaded, sweep, model_dir=model_dir, compile_backend=settings["compile_backend"])
        settings = {**settings, **applied.settings}
        log.info("sweep point %s: %s", sweep.slug, applied.reason or applied.method)
    tables = []
    for task, spec in sorted(tasks.items()):
        if applied is not None and applied.reason:
            simulated = bool(manifest and manifest.get("simulated"))
            df = not_measured(applied.reason, batch_size=settings["batch_size"], device=str(where), simulated=simulated)
        else:
            graphs = compiled_graphs()
            df = measure(
                loaded,
                pd.read_parquet(spec["table"]),
                spec["root"],
                task,
                settings=settings,
                generation=generate_kwargs(spec.get("generation") or {}),
                manifest=manifest,
                sizes=sweep is None,
                image_size=applied.image_size if applied else None,
                prompt_length=applied.prompt_length if applied else None,
            )
            if applied is not None:
                df = sweep_rows(df, applied, sweep, compiled_graphs() - graphs)
        if sweep is not None:
            df["sweep_axis"], df["sweep_value"] = sweep.axis, sweep.text
        task_keys = {**keys, "task": task, "dataset": spec["dataset"]}
        provenance = {"chain": chain, "profiling": settings, "task": spec, "point": point}
        tables.append(efficiency_rows(df, task_keys, provenance))
        shown = df.set_index("measure")["value"]
        log.info(
            "%s: latency %s ms per batch of %d, peak memory %s MiB, %s GFLOP per sample",
            task,
            _shown(shown["latency_ms_p50"], ".2f"),
            int(df["batch_size"].iloc[0]),
            _shown(shown["peak_mem_mb"], ".0f"),
            _shown(shown["gflops_per_sample"], ".4f"),
        )
    rows = pa.concat_tables(tables).cast(EFFICIENCY_SCHEMA)
    write_parquet(rows, out)
    return rows.to_pandas()


def _shown(value: Any, fmt: str) -> str:
    return "n/a" if value is None or pd.isna(value) else format(value, fmt)


def gather_predictions(
    shards: Iterable[str | Path], table: str | Path, out: str | Path, *, log_path: str | Path | None = None
) -> None:
    """Merge shard predictions in dataset order, refusing duplicates and gaps.

    ``log_path`` receives one line: what was merged, or why merging failed (the error is raised too).
    """
    shards = list(shards)
    try:
        frames, meta = [], {}
        for path in shards:
            df, meta = read_predictions(path)
            frames.append(df)
        write_predictions(merge_shards(frames, pd.read_parquet(table, columns=["sample_id"])), out, meta)
    except Exception as exc:
        if log_path is not None:
            Path(log_path).write_text(f"gather_predictions failed: {type(exc).__name__}: {exc}\n")
        raise
    if log_path is not None:
        Path(log_path).write_text(f"merged {len(shards)} shard(s) into {out}\n")


def score_predictions(
    predictions: str | Path, table: str | Path, out: str | Path, *, keys: dict[str, str], settings: Any
) -> dict[str, float]:
    """Score predictions against the dataset split on CPU (the task's :meth:`~vlmopt.tasks.base.Task.score`)
    and write long-format score rows."""
    from vlmopt.tasks import get_task

    preds, _ = read_predictions(predictions)
    data = pd.read_parquet(table)
    if set(preds["sample_id"]) != set(data["sample_id"]):
        raise ValueError(f"{predictions} does not cover exactly the samples of {table}")
    metrics = get_task(keys["task"]).score(preds, data, source=str(table))
    n_failed = int(preds["error"].notna().sum())
    write_parquet(score_rows(keys, metrics, n_samples=len(preds), n_failed=n_failed, settings=settings), out)
    return metrics


def build_tables(
    score_files: Iterable[str | Path],
    model_dirs: Iterable[str | Path],
    out_dir: str | Path,
    profile_files: Iterable[str | Path] = (),
) -> pd.DataFrame:
    """Concatenate scores into ``scores.parquet`` and efficiency rows into ``efficiency.parquet``;
    write ``variants.parquet`` (each variant's compression steps and their settings, from the
    manifests) and ``summary.parquet`` (metrics, method, sizes and the main efficiency measures as
    columns)."""
    from vlmopt.tables import EFFICIENCY_SCHEMA, STEPS_SCHEMA, size_columns, variant_steps

    out_dir = Path(out_dir)
    scores = pd.concat([pd.read_parquet(p) for p in score_files], ignore_index=True)
    write_parquet(pa.Table.from_pandas(scores, preserve_index=False), out_dir / "scores.parquet")
    frames = [pd.read_parquet(p) for p in profile_files]
    efficiency = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=EFFICIENCY_SCHEMA.names)
    write_parquet(
        pa.Table.from_pandas(efficiency, schema=EFFICIENCY_SCHEMA, preserve_index=False),
        out_dir / "efficiency.parquet",
    )
    sizes, steps = [], []
    for folder in model_dirs:
        folder = Path(folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        keys = dict(zip(("model", "ft", "variant"), folder.parts[-3:], strict=True))
        sizes.append({**keys, **size_columns(manifest)})
        steps += variant_steps(keys, manifest)
    write_parquet(pa.Table.from_pylist(steps, schema=STEPS_SCHEMA), out_dir / "variants.parquet")
    summary = summarise(scores, sizes, efficiency)
    write_parquet(pa.Table.from_pandas(summary, preserve_index=False), out_dir / "summary.parquet")
    return summary


def build_plots(summary: str | Path, out_dir: str | Path) -> list[Path]:
    """The default study's figures (PNG) from ``summary.parquet``."""
    from vlmopt.plots import quality_vs_cost, quality_vs_size, task_bars

    df = pd.read_parquet(summary)
    out_dir = Path(out_dir)
    return [
        quality_vs_size(df, out_dir / "quality_vs_size.png"),
        task_bars(df, out_dir / "task_bars.png"),
        quality_vs_cost(df, out_dir / "quality_vs_cost.png"),
    ]


def build_html_report(
    tables: str | Path,
    out: str | Path,
    study: dict[str, Any] | None = None,
    *,
    predictions: str | Path | None = None,
    data: str | Path | None = None,
    figures: Iterable[str | Path] = (),
) -> Path:
    """The study's HTML report (:func:`vlmopt.report.build_report`) in ``out/index.html``, with the
    ``figures`` already drawn (``<name>.png``, ``<name>.html``) as they are."""
    from vlmopt.report import build_report

    drawn = {Path(f).name.rsplit(".", 1)[0]: Path(f) for f in figures}
    return build_report(tables, out, config=study, predictions=predictions, data=data, drawn=drawn)


def build_figure(
    name: str,
    tables: str | Path,
    out: str | Path,
    *,
    predictions: str | Path | None = None,
    data: str | Path | None = None,
) -> Path:
    """One figure of the report (:func:`vlmopt.report.draw_figure`) from the tables in ``tables``."""
    from vlmopt.report import draw_figure

    return draw_figure(name, tables, out, predictions=predictions, data=data)


def start_job(log_path: str | Path, threads: int = 1) -> None:
    """Send stderr and logging to the job's log file and bound torch's threads to the job's share.

    torch is not imported here: jobs that never use it (gathering, scoring, tables) would pay
    seconds of import time for nothing. The thread count goes into ``OMP_NUM_THREADS`` and
    ``MKL_NUM_THREADS``, which torch reads when it is first imported, and into
    ``torch.set_num_threads`` if torch is already loaded.
    """
    import os
    import sys

    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    sys.stderr = open(log_path, "w", buffering=1)  # noqa: SIM115 - lives as long as the job
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    n = str(max(1, int(threads)))
    os.environ["OMP_NUM_THREADS"] = n
    os.environ["MKL_NUM_THREADS"] = n
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(n))
