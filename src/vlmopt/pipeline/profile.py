"""Pipeline stages: profiling a variant (and one sweep point)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from vlmopt.tables import write_parquet

log = logging.getLogger(__name__)

__all__ = ["profile_variant"]


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
    ``settings``. Runs on ``device`` (the GPU where there is one; the CPU for dynamic int8 variants);
    a packed variant's Linears run on a low-bit kernel where one takes them (``kernels`` setting).
    ``point`` (``{axis, value}``) measures one sweep point instead (:mod:`vlmopt.profiling.sweep`):
    the rows carry ``sweep_axis`` and ``sweep_value`` and no size rows.
    """
    from vlmopt.compress.kernels import use_kernels
    from vlmopt.compress.saved import load_variant, read_manifest
    from vlmopt.data.schema import require_rows
    from vlmopt.device import place
    from vlmopt.infer import generate_kwargs
    from vlmopt.profiling.sweep import SweepPoint, apply_point, compiled_graphs, sweep_rows
    from vlmopt.profiling.variant import DEFAULTS, not_measured, runs_simulated
    from vlmopt.profiling.variant import profile_variant as measure
    from vlmopt.tables import EFFICIENCY_SCHEMA, efficiency_rows

    if not tasks:
        raise ValueError(f"nothing to profile for {model_dir}: no tasks given")
    for task, spec in sorted(tasks.items()):
        require_rows(spec["table"], f"profiling of {task} (inference.split)")
    sweep = SweepPoint(point["axis"], point["value"]) if point is not None else None
    loaded = load_variant(model_dir)
    where = place(loaded.model, device, model_dir=model_dir)
    manifest = read_manifest(model_dir)
    settings = {**DEFAULTS, **settings}
    # Packed Linears multiply through a low-bit kernel where one takes them (vlmopt.compress.kernels).
    kernel = use_kernels(loaded.model, model_dir, enabled=bool(settings["kernels"]))
    applied = None
    if sweep is not None:
        applied = apply_point(loaded, sweep, model_dir=model_dir, compile_backend=settings["compile_backend"])
        settings = {**settings, **applied.settings}
        log.info("sweep point %s: %s", sweep.slug, applied.reason or applied.method)
    tables = []
    for task, spec in sorted(tasks.items()):
        if applied is not None and applied.reason:
            df = not_measured(
                applied.reason,
                batch_size=settings["batch_size"],
                device=str(where),
                simulated=runs_simulated(manifest, kernel),
                kernel=kernel.kernel,
            )
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
                kernel=kernel,
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
