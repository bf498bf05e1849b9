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
    "load_variant",
    "predict_shard",
    "prepare_dataset",
    "profile_variant",
    "score_predictions",
    "start_job",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


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

    source = settings.get("source", "synthetic")
    if source == "labeled":
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
    from vlmopt.data.labeling import REASON_QUESTIONS, check_real_generated_labels, make_labeled

    captioner = settings.get("captioner")
    captions: dict[str, str] = {}
    reasons: dict[str, str] = {}
    if captioner:
        if captioner_dir is None:
            raise ValueError(f"dataset {name!r}: a captioner is configured but no captioner model folder was given")
        from vlmopt.device import place
        from vlmopt.infer import generation_settings, predict
        from vlmopt.models import load_model

        loaded = load_model(captioner_dir)
        place(loaded.model, device, model_dir=captioner_dir)
        gen = generation_settings(
            max_new_tokens=captioner.get("max_new_tokens", 20), num_beams=captioner.get("num_beams", 1)
        )
        batch_size = captioner.get("batch_size", 16)
        for split in SPLITS:
            df = pd.read_parquet(Path(source_root) / f"{split}.parquet")
            if df.empty:
                continue
            check_real_generated_labels(df, f"dataset {settings.get('dataset')!r} ({split})")
            run = {"batch_size": batch_size, "generate_kwargs": gen, "max_error_fraction": 0.05}
            out = predict(loaded, df, source_root, "captioning", **run)
            captions.update(zip(out["sample_id"], out["prediction"].fillna(""), strict=True))
            if captioner.get("reason", True):
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
        dtype=settings.get("dtype"),
        texts=texts,
        seed=seed,
        image_size=settings.get("image_size", 64),
        trust_remote_code=settings.get("trust_remote_code", False),
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
    from vlmopt.finetune import FullFinetuneConfig, finetune
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
    them, and :func:`load_variant` re-applies them. Calibration, GPTQ, AWQ and LoRA training run on
    ``device`` (:func:`vlmopt.device.resolve_device`: the GPU where there is one).
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

    The steps run on the model's device; on return ``loaded`` is the model as :func:`load_variant`
    reads it back from ``out_dir``, on the CPU (runtime steps applied, kept adapters attached).
    ``source`` is the folder it was loaded from, hashed into the manifest.
    """
    from vlmopt.compress import (
        TrainingData,
        apply_runtime_steps,
        apply_variant,
        restore_adapters,
        save_adapters,
        serialized_size,
        write_manifest,
    )
    from vlmopt.compress.calibrate import Calibration
    from vlmopt.tables import config_hash

    def calibration(spec: dict[str, Any]) -> Calibration:
        root = Path(data_root) / spec["dataset"]
        table = pd.read_parquet(root / f"{spec['split']}.parquet")
        return Calibration.from_table(
            loaded, table, root, n_samples=spec["n"], batch_size=spec["batch_size"], seed=spec["seed"]
        )

    def training(spec: dict[str, Any]) -> TrainingData:
        root = Path(data_root) / spec["dataset"]
        return TrainingData(loaded, pd.read_parquet(root / f"{spec['split']}.parquet"), root)

    manifest = apply_variant(
        loaded.model, loaded.parts(), steps, defer_runtime=True, calibration=calibration, training=training
    )
    out_dir = Path(out_dir)
    # Saved from the CPU, where runtime steps (dynamic int8) run.
    loaded.model.to("cpu")
    # Kept LoRA adapters go to their own files; the folder's model is the base model.
    save_adapters(loaded.model, out_dir)
    loaded.save(out_dir)
    restore_adapters(loaded.model, manifest, out_dir)
    apply_runtime_steps(loaded.model, loaded.parts(), manifest)
    inputs = {"model": _folder_digest(source) if source is not None else None, "steps": steps}
    write_manifest(
        out_dir / "manifest.json",
        manifest,
        serialized_size_bytes=serialized_size(loaded.model),
        inputs_hash=config_hash(inputs),
    )
    return manifest


def _folder_digest(folder: str | Path) -> str:
    """Hash of a saved model's weights and config files (what a variant was computed from)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(Path(folder).glob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".json"):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def load_variant(model_dir: str | Path, *, dtype: str | None = None):
    """Load a compressed model folder as it was evaluated, from its manifest.

    ``from_pretrained`` builds the original dense architecture (in the dtype of a ``precision``
    step), then, in order: pruned attention heads are shrunk and loaded, low-rank (SVD) layers
    rebuilt and their factors loaded, kept LoRA adapters re-injected, runtime steps (dynamic int8)
    applied to the loaded float weights, and simulated activation quantizers re-attached.
    """
    from transformers.utils import logging as hf_logging

    from vlmopt.compress import apply_runtime_steps, restore_activation_quant, restore_adapters, restore_structure
    from vlmopt.compress.heads import load_head_pruned, restore_pruned_heads
    from vlmopt.compress.precision import precision_dtype
    from vlmopt.models import load_model

    manifest_path = Path(model_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if dtype is None and manifest is not None:
        # Not every config class restores a float16 checkpoint as float16 by itself.
        dtype = precision_dtype(manifest)
    factorized = manifest is not None and any(s.get("method") == "svd" for s in manifest.get("steps", []))
    heads_pruned = manifest is not None and any(s.get("method") == "prune_heads" for s in manifest.get("steps", []))
    level = hf_logging.get_verbosity()
    if factorized or heads_pruned:
        # The dense weights of factorized layers are missing by design; restore_structure loads them.
        hf_logging.set_verbosity_error()
    try:
        # Pruned attention is smaller than the config says; restore_pruned_heads shrinks and loads it.
        loaded = load_head_pruned(model_dir, dtype=dtype) if heads_pruned else load_model(model_dir, dtype=dtype)
    finally:
        hf_logging.set_verbosity(level)
    if manifest is not None:
        restore_pruned_heads(loaded.model, manifest, model_dir)
        restore_structure(loaded.model, manifest, model_dir)
        restore_adapters(loaded.model, manifest, model_dir)
        apply_runtime_steps(loaded.model, loaded.parts(), manifest)
        # Last, so that the input quantizers sit on the modules that finally run (int8 ones included).
        restore_activation_quant(loaded.model, manifest)
    return loaded


def _parse_scatteritem(item: str) -> tuple[int, int]:
    """'2-of-3' -> (1, 3): 0-based shard and shard count."""
    try:
        i, n = item.split("-of-")
        shard, n_shards = int(i) - 1, int(n)
    except ValueError as exc:
        raise ValueError(f"shard name {item!r} is not of the form '<i>-of-<n>'") from exc
    return shard, n_shards


#: generate() settings a study may set besides max_new_tokens and num_beams.
GENERATION_EXTRAS = ("length_penalty", "min_new_tokens", "repetition_penalty")


def _generate_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """generate() keyword arguments from a task's generation settings (defaults: 20 tokens, greedy)."""
    from vlmopt.infer import generation_settings

    extra = {k: settings[k] for k in GENERATION_EXTRAS if k in settings}
    return generation_settings(
        max_new_tokens=settings.get("max_new_tokens", 20), num_beams=settings.get("num_beams", 1), **extra
    )


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
    from vlmopt.device import place
    from vlmopt.infer import predict

    shard_index, n_shards = _parse_scatteritem(shard)
    gen = _generate_kwargs(settings)
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
            max_error_fraction=settings.get("max_error_fraction", 0.05),
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
        max_error_fraction=settings.get("max_error_fraction", 0.05),
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
    from vlmopt.device import place
    from vlmopt.profiling.sweep import SweepPoint, apply_point, compiled_graphs
    from vlmopt.profiling.variant import DEFAULTS, not_measured
    from vlmopt.profiling.variant import profile_variant as measure
    from vlmopt.tables import EFFICIENCY_SCHEMA, efficiency_rows

    if not tasks:
        raise ValueError(f"nothing to profile for {model_dir}: no tasks given")
    sweep = SweepPoint(point["axis"], point["value"]) if point is not None else None
    loaded = load_variant(model_dir)
    where = place(loaded.model, device, model_dir=model_dir)
    manifest_path = Path(model_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
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
                generation=_generate_kwargs(spec.get("generation") or {}),
                manifest=manifest,
                sizes=sweep is None,
                image_size=applied.image_size if applied else None,
                prompt_length=applied.prompt_length if applied else None,
            )
            if applied is not None:
                df = _sweep_rows(df, applied, sweep, compiled_graphs() - graphs)
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


def _sweep_rows(df: pd.DataFrame, applied: Any, sweep: Any, graphs: int) -> pd.DataFrame:
    """A sweep point's rows: what the point changed in ``method``, its caveat in ``note``, compiled graphs."""
    df = df.copy()
    if applied.method:
        df["method"] = applied.method + "; " + df["method"].fillna("")
    if applied.note:
        df["note"] = [applied.note if pd.isna(n) else f"{n}; {applied.note}" for n in df["note"]]
    if sweep.axis == "compile" and sweep.value:
        extra = df.iloc[[0]].copy()
        extra[["measure", "value", "unit", "method", "note"]] = [
            "compiled_graphs",
            float(graphs),
            "graphs",
            "graphs torch.compile built during this task's calls (torch._dynamo counters)",
            None,
        ]
        df = pd.concat([df, extra], ignore_index=True)
    return df


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
    """Score predictions against the dataset split on CPU and write long-format score rows."""
    from vlmopt.metrics import caption_scores, exact_match_accuracy, vqa_accuracy, word_error_rate

    preds, _ = read_predictions(predictions)
    data = pd.read_parquet(table)
    if set(preds["sample_id"]) != set(data["sample_id"]):
        raise ValueError(f"{predictions} does not cover exactly the samples of {table}")
    data = data.set_index("sample_id").loc[preds["sample_id"]]
    pred = dict(zip(preds["sample_id"], preds["prediction"].fillna(""), strict=True))
    task = keys["task"]
    if task == "captioning":
        refs = {sid: list(r) for sid, r in zip(data.index, data["references"], strict=True)}
        metrics = caption_scores(pred, refs)
    elif task == "vqa":
        answers = {sid: list(a) for sid, a in zip(data.index, data["answers"], strict=True)}
        types = dict(zip(data.index, data["answer_type"], strict=True))
        result = vqa_accuracy(pred, answers, types)
        metrics = {"vqa_accuracy": result["overall"]}
        metrics.update({f"vqa_accuracy/{t}": v for t, v in result["per_answer_type"].items()})
        # Single-answer datasets (GQA) are scored by exact match; VQA accuracy cannot reach 100 there.
        metrics["exact_match"] = exact_match_accuracy(pred, answers)["overall"]
        # Word error rate against the most common answer (ties: the first listed), as generated.
        majority = {sid: max(a, key=lambda x, a=a: (a.count(x), -a.index(x))) for sid, a in answers.items()}
        scorable = {sid: m for sid, m in majority.items() if any(ch.isalnum() for ch in m)}
        if scorable:  # an answer with no word (punctuation only) has no word error rate
            metrics["wer"] = word_error_rate({sid: pred[sid] for sid in scorable}, scorable)["wer"]
        if {"choices", "answer_index"} <= set(data.columns):
            # Multiple choice (ScienceQA): the option the answer picks, by letter or by text.
            from vlmopt.metrics import multiple_choice_accuracy

            choices = {sid: list(c) for sid, c in zip(data.index, data["choices"], strict=True)}
            index = {sid: int(i) for sid, i in zip(data.index, data["answer_index"], strict=True)}
            result = multiple_choice_accuracy(pred, choices, index, answer_types=types)
            metrics["mc_accuracy"] = result["overall"]
            metrics.update({f"mc_accuracy/{t}": v for t, v in result["per_answer_type"].items()})
            metrics["mc_unparsed"] = float(result["n_unparsed"])
    elif task == "real_vs_generated":
        from vlmopt.data.labeling import check_real_generated_labels
        from vlmopt.metrics.real_vs_generated import binary_report, extract_label

        check_real_generated_labels(data, str(table))
        metrics = binary_report([int(y) for y in data["label"]], [extract_label(pred[sid]) for sid in data.index])
    elif task in ("retrieval", "classification"):
        metrics = _similarity_metrics(task, preds, pd.read_parquet(table))
    else:
        raise ValueError(f"no scorer for task {task!r}")
    n_failed = int(preds["error"].notna().sum())
    write_parquet(score_rows(keys, metrics, n_samples=len(preds), n_failed=n_failed, settings=settings), out)
    return metrics


def _similarity_metrics(task: str, preds: pd.DataFrame, table: pd.DataFrame) -> dict[str, float]:
    """Recall@k (retrieval) or top-k accuracy (classification) from the predictions' score lists."""
    import numpy as np

    from vlmopt.metrics import retrieval_recall, topk_accuracy
    from vlmopt.tasks import ClassificationTask, RetrievalTask

    by_id = {sid: i for i, sid in enumerate(preds["sample_id"])}
    at = [by_id[sid] for sid in table["sample_id"]]

    def matrix(column: str, width: int) -> np.ndarray:
        out = np.full((len(table), width), np.nan)
        for row, i in enumerate(at):
            values = preds[column].iloc[i]
            if values is not None and not (isinstance(values, float) and np.isnan(values)):
                if len(values) != width:
                    raise ValueError(
                        f"{column} of {preds['sample_id'].iloc[i]!r} has {len(values)} values, not {width}"
                    )
                out[row] = values
        return out

    if task == "classification":
        labels, names = ClassificationTask.classes(table)
        index = {label: i for i, label in enumerate(labels)}
        scores = matrix("scores", len(labels))
        metrics = topk_accuracy(scores, [index[int(y)] for y in table["label"]])
        if labels == [0, 1] and names == ["real", "generated"]:
            # Real vs generated: the same report as the generative classifiers (an unread image is unparsed).
            from vlmopt.metrics.real_vs_generated import binary_report

            chosen = [None if np.isnan(row).all() else int(np.argmax(row)) for row in scores]
            metrics |= binary_report([int(y) for y in table["label"]], chosen)
        return metrics
    texts, owners = RetrievalTask.texts(table)
    img2txt: list[list[int]] = [[] for _ in range(len(table))]
    for j, row in enumerate(owners):
        img2txt[row].append(j)
    return retrieval_recall(matrix("scores", len(texts)), matrix("scores_t2i", len(texts)).T, img2txt, owners)


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
    from vlmopt.tables import EFFICIENCY_SCHEMA, STEPS_SCHEMA, variant_steps

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
        sizes.append({**keys, **_size_columns(manifest)})
        steps += variant_steps(keys, manifest)
    write_parquet(pa.Table.from_pylist(steps, schema=STEPS_SCHEMA), out_dir / "variants.parquet")
    summary = summarise(scores, sizes, efficiency)
    write_parquet(pa.Table.from_pandas(summary, preserve_index=False), out_dir / "summary.parquet")
    return summary


def _size_columns(manifest: dict[str, Any]) -> dict[str, Any]:
    from vlmopt.tables import variant_method

    return {
        "method": variant_method(manifest),
        "size_bytes": manifest.get("serialized_size_bytes"),
        "nominal_size_bytes": manifest.get("nominal_size_bytes"),
        "nominal_bits": manifest.get("nominal_bits_per_parameter"),
        "representation": manifest.get("representation"),
        "simulated": manifest.get("simulated"),
    }


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
