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
    work_dir: str | Path | None = None,
    code: str | None = None,
    chunk_size: int | None = None,
) -> None:
    """Label dataset ``settings['dataset']`` (at ``source_root``) for real-vs-generated finetuning.

    With a captioner (``settings['captioner']``: ``model``, ``finetune``, ``reason``,
    ``batch_size``, ``max_new_tokens``, ``num_beams``), the model in ``captioner_dir`` captions
    every image and, unless ``reason`` is false, answers the study's "What details indicate this
    image is (not) AI-generated?" for its label; the texts go into each image's label text (see
    :mod:`vlmopt.data.labeling`). Greedy decoding, so the labels do not depend on batch size.
    The captioner runs on ``device`` (:func:`vlmopt.device.resolve_device`: the GPU where there is one).

    Each split is labeled in chunks of ``chunk_size`` images (default
    :data:`vlmopt.data.labeling.CHUNK_SIZE`, rounded up to whole batches), each kept in
    ``work_dir`` (default: ``.<out_dir name>.labeling`` beside ``out_dir``) as soon as it is done
    (:class:`vlmopt.chunks.ChunkStore`, a group of chunks per split), so that a killed job's rerun resumes at the first
    chunk not done, with the same result. The chunks are fingerprinted with the captioner settings,
    the digests of the captioner model folder and of the source tables, the chunk size, the device
    type and ``code`` (the stage's code digest); ``work_dir`` is removed once the outputs are written.
    """
    import logging
    import math

    from vlmopt.chunks import ChunkStore
    from vlmopt.data import SPLITS
    from vlmopt.data.labeling import CAPTIONER_DEFAULTS, CHUNK_SIZE, check_real_generated_labels, make_labeled

    log = logging.getLogger(__name__)
    source_root, out_dir = Path(source_root), Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else out_dir.with_name(f".{out_dir.name}.labeling")
    captioner = {**CAPTIONER_DEFAULTS, **settings["captioner"]} if settings.get("captioner") else None
    captions: dict[str, str] = {}
    reasons: dict[str, str] = {}
    if captioner:
        if captioner_dir is None:
            raise ValueError(f"dataset {name!r}: a captioner is configured but no captioner model folder was given")
        from vlmopt.checkpoints import folder_fingerprint
        from vlmopt.data.download import file_digest
        from vlmopt.device import place, resolve_device
        from vlmopt.infer import INFERENCE_DEFAULTS, generation_settings

        gen = generation_settings(max_new_tokens=captioner["max_new_tokens"], num_beams=captioner["num_beams"])
        batch_size = int(captioner["batch_size"])
        if batch_size < 1:
            raise ValueError(f"dataset {name!r}: the captioner's batch_size must be at least 1, got {batch_size}")
        chunk_rows = batch_size * max(1, math.ceil((chunk_size or CHUNK_SIZE) / batch_size))
        max_error_fraction = INFERENCE_DEFAULTS["max_error_fraction"]
        paths = {split: source_root / f"{split}.parquet" for split in SPLITS}
        for path in paths.values():
            if not path.exists():
                raise FileNotFoundError(f"labeling: the source split {str(path)!r} is missing")
        work = ChunkStore(
            work_dir,
            {
                "captioner": captioner,
                "generate_kwargs": gen,
                "captioner_model": folder_fingerprint(captioner_dir),
                "tables": {split: file_digest(path) for split, path in paths.items()},
                "chunk_rows": chunk_rows,
                "device": resolve_device(device).type,
                "code": code,
            },
            what="labeling",
        )
        loaded = None
        for split, path in paths.items():
            df = pd.read_parquet(path)
            if df.empty:
                continue
            check_real_generated_labels(df, f"dataset {settings.get('dataset')!r} ({split})")
            errors: dict[str, list[str | None]] = {"caption": [], "reason": []}
            n_chunks = math.ceil(len(df) / chunk_rows)
            resumed = None
            for index in range(n_chunks):
                rows = df.iloc[index * chunk_rows : (index + 1) * chunk_rows].reset_index(drop=True)
                sample_ids = rows["sample_id"].astype(str).tolist()
                columns = work.read(index, split, sample_ids=sample_ids)
                if columns is None:
                    if resumed is None:
                        resumed = index
                        if index:
                            log.info(
                                "labeling %s: resuming split %s at row %d (chunk %d of %d) from %s",
                                name,
                                split,
                                index * chunk_rows,
                                index + 1,
                                n_chunks,
                                work.directory,
                            )
                    if loaded is None:
                        from vlmopt.models import load_model

                        loaded = load_model(captioner_dir)
                        place(loaded.model, device, model_dir=captioner_dir)
                    columns = _caption_chunk(loaded, rows, source_root, batch_size, gen, captioner["reason"])
                    work.write(index, columns, split, schema=_chunk_schema(columns))
                    log.info(
                        "labeling %s: split %s rows %d-%d of %d done",
                        name,
                        split,
                        index * chunk_rows,
                        index * chunk_rows + len(rows),
                        len(df),
                    )
                captions.update(zip(columns["sample_id"], columns["caption"], strict=True))
                errors["caption"] += columns["caption_error"]
                if captioner["reason"]:
                    reasons.update(zip(columns["sample_id"], columns["reason"], strict=True))
                    errors["reason"] += columns["reason_error"]
            if resumed is None:
                log.info(
                    "labeling %s: split %s: all %d chunk(s) already done in %s", name, split, n_chunks, work.directory
                )
            for what, found in errors.items():
                n_failed = sum(e is not None for e in found)
                if found and n_failed / len(found) > max_error_fraction:
                    raise RuntimeError(
                        f"labeling {name} ({split} {what}s): {n_failed} of {len(found)} samples failed "
                        f"(more than {max_error_fraction:.0%}); first error: {next(e for e in found if e)}"
                    )
    make_labeled(out_dir, source_root=source_root, captions=captions, reasons=reasons)
    if captioner:
        work.remove()


def _caption_chunk(
    loaded: Any, rows: pd.DataFrame, source_root: Path, batch_size: int, gen: dict[str, Any], reason: bool
) -> dict[str, list]:
    """The captions (and reasons) of one chunk of a split's rows, with each row's error (None where
    it was read): the columns of a labeling chunk (:data:`vlmopt.data.labeling.CHUNK_COLUMNS`)."""
    from vlmopt.data.labeling import REASON_QUESTIONS
    from vlmopt.infer import predict

    # Failures are counted over the whole split by the caller, as one call for the split would.
    run = {"batch_size": batch_size, "generate_kwargs": gen, "max_error_fraction": 1.0, "progress": False}

    def texts(out: pd.DataFrame) -> tuple[list[str], list[str | None]]:
        return out["prediction"].fillna("").tolist(), out["error"].astype(object).where(
            out["error"].notna(), None
        ).tolist()

    columns = {"sample_id": rows["sample_id"].astype(str).tolist()}
    columns["caption"], columns["caption_error"] = texts(predict(loaded, rows, source_root, "captioning", **run))
    if reason:
        questions = rows.assign(
            question=[REASON_QUESTIONS[int(y)] for y in rows["label"]], answers=[["-"]] * len(rows), answer_type="other"
        )
        columns["reason"], columns["reason_error"] = texts(predict(loaded, questions, source_root, "vqa", **run))
    return columns


def _chunk_schema(columns: dict[str, list]) -> Any:
    """String columns, so that a chunk whose errors are all None keeps them as strings."""
    import pyarrow as pa

    from vlmopt.data.labeling import CHUNK_COLUMNS

    return pa.schema([(c, pa.string()) for c in CHUNK_COLUMNS if c in columns])
