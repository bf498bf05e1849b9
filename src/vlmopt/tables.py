"""Result tables: predictions, long-format scores with provenance, and the per-variant summary.

Every table is written atomically (temp file, then rename) so a killed job never leaves a file
that a rerun would trust, and validated against its schema on write.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import vlmopt

__all__ = [
    "EFFICIENCY_SCHEMA",
    "KEYS",
    "SCORES_SCHEMA",
    "STEPS_SCHEMA",
    "SUMMARY_COUNTS",
    "SUMMARY_MEASURES",
    "config_hash",
    "efficiency_rows",
    "merge_shards",
    "provenance",
    "read_predictions",
    "score_rows",
    "size_columns",
    "summarise",
    "variant_method",
    "variant_steps",
    "write_parquet",
    "write_predictions",
]

#: Columns that identify one evaluated configuration.
KEYS = ("model", "ft", "variant", "task", "dataset")

PREDICTIONS_SCHEMA = pa.schema([("sample_id", pa.string()), ("prediction", pa.string()), ("error", pa.string())])
#: Score lists of similarity tasks (classification: per class; retrieval: per caption, both directions).
SCORE_COLUMNS = {"scores": pa.list_(pa.float32()), "scores_t2i": pa.list_(pa.float32())}
SCORES_SCHEMA = pa.schema(
    [(k, pa.string()) for k in KEYS]
    + [
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("n_samples", pa.int64()),
        ("n_failed", pa.int64()),
        ("git_sha", pa.string()),
        ("config_hash", pa.string()),
        ("vlmopt_version", pa.string()),
        ("torch_version", pa.string()),
        ("transformers_version", pa.string()),
        ("created_at", pa.string()),
    ]
)


#: Provenance columns of score and efficiency rows (see :func:`provenance`).
PROVENANCE = ("git_sha", "config_hash", "vlmopt_version", "torch_version", "transformers_version", "created_at")
#: Efficiency: one row per (model, ft, variant, task, measure) and sweep point; ``dataset`` is the one profiled.
EFFICIENCY_SCHEMA = pa.schema(
    [(k, pa.string()) for k in KEYS]
    + [
        ("measure", pa.string()),
        ("value", pa.float64()),
        ("unit", pa.string()),
        ("method", pa.string()),
        ("note", pa.string()),
        ("batch_size", pa.int64()),
        ("device", pa.string()),
        ("simulated", pa.bool_()),
        # The low-bit kernel the packed Linears ran on (vlmopt.compress.kernels), "none" for dense weights.
        ("kernel", pa.string()),
        # A sweep point's rows (vlmopt.profiling.sweep): the axis and its value; null on a variant's own profile.
        ("sweep_axis", pa.string()),
        ("sweep_value", pa.string()),
    ]
    + [(c, pa.string()) for c in PROVENANCE]
)
#: Counts of each evaluation that the summary table carries as columns, from its score rows:
#: the samples scored, and those among them whose image could not be read.
SUMMARY_COUNTS = ("n_samples", "n_failed")
#: Efficiency measures that the summary table carries as columns, beside the quality metrics.
SUMMARY_MEASURES = (
    "latency_ms_p50",
    "latency_ms_per_sample_p50",
    "throughput_samples_per_s",
    "peak_mem_mb",
    "energy_j_per_sample",
    "gflops_per_sample",
    "decode_bandwidth_fraction",
    "prefill_compute_fraction",
)


#: Settings of compression steps that the variants table carries as columns (others are left out).
STEP_SETTINGS = {
    "part": pa.string(),
    "position": pa.string(),
    "role": pa.string(),
    "bits": pa.int64(),
    "group_size": pa.int64(),
    "activation_bits": pa.int64(),
    "granularity": pa.string(),
    "ratio": pa.float64(),
    "keep": pa.int64(),
    "drop_last": pa.int64(),
    "fraction": pa.float64(),
    "r": pa.int64(),
    "dtype": pa.string(),
    "backend": pa.string(),
}
#: One row per compression step of each (model, ft, variant); a variant without steps has one row
#: with step -1 and method "none", so that every variant is in the table.
STEPS_SCHEMA = pa.schema(
    [("model", pa.string()), ("ft", pa.string()), ("variant", pa.string())]
    + [("step", pa.int64()), ("method", pa.string())]
    + list(STEP_SETTINGS.items())
    + [("simulated", pa.bool_()), ("n_modules", pa.int64()), ("n_layers", pa.int64())]
)


def variant_method(manifest: dict[str, Any]) -> str:
    """The variant's methods in order, joined by "+" ("none" for a variant without steps)."""
    return "+".join(manifest.get("methods") or []) or "none"


def _setting(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return "+".join(map(str, value)) if value else None
    return value


def _n_layers(step: dict[str, Any]) -> int | None:
    """How many layers (distinct part and layer index) the step's modules lie in; None when its
    manifest lists no module with a layer index (e.g. a whole-model cast)."""
    layers = {
        (m.get("part"), m["layer_index"])
        for m in step.get("modules") or []
        if isinstance(m, dict) and m.get("layer_index") is not None
    }
    return len(layers) or None


def variant_steps(keys: dict[str, str], manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of :data:`STEPS_SCHEMA` for one variant, from its manifest's steps."""
    base = {k: keys[k] for k in ("model", "ft", "variant")}
    steps = manifest.get("steps") or []
    if not steps:
        return [{**base, "step": -1, "method": "none", "simulated": False, "n_modules": 0, "n_layers": 0}]
    rows = []
    for i, step in enumerate(steps):
        settings = step.get("settings") or {}
        row = {**base, "step": i, "method": step.get("method"), "simulated": step.get("simulated")}
        row["n_modules"] = step.get("n_modules")
        row["n_layers"] = _n_layers(step)
        for name, typ in STEP_SETTINGS.items():
            value = _setting(settings.get(name))
            if value is not None and pa.types.is_integer(typ) and not isinstance(value, int):
                value = None  # e.g. a per-part mapping where one number was expected
            row[name] = value
        rows.append(row)
    return rows


def write_parquet(table: pa.Table, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``table`` to ``path`` atomically, with ``metadata`` as JSON key-value metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if metadata:
        existing = dict(table.schema.metadata or {})
        existing.update({k.encode(): json.dumps(v, sort_keys=True).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(existing)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def write_predictions(df: pd.DataFrame, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write predictions (``sample_id``, ``prediction``, ``error``, and any score lists) with settings as metadata."""
    schema = PREDICTIONS_SCHEMA
    for name, typ in SCORE_COLUMNS.items():
        if name in df.columns:
            schema = schema.insert(schema.get_field_index("error"), pa.field(name, typ))
    table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    return write_parquet(table, path, metadata)


def read_predictions(path: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Predictions and their metadata (generation settings, model, variant ...)."""
    table = pq.read_table(path)
    meta = {k.decode(): json.loads(v) for k, v in (table.schema.metadata or {}).items() if k != b"pandas"}
    return table.to_pandas(), meta


def config_hash(settings: Any) -> str:
    """Short stable hash of JSON-serialisable settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance(settings: Any) -> dict[str, Any]:
    """Provenance columns of a score row: code version, library versions, settings hash, time."""
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {
        "git_sha": _git_sha(),
        "config_hash": config_hash(settings),
        "vlmopt_version": vlmopt.__version__,
        "torch_version": version("torch"),
        "transformers_version": version("transformers"),
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def score_rows(
    keys: dict[str, str], metrics: dict[str, float], *, n_samples: int, n_failed: int, settings: Any
) -> pa.Table:
    """Long-format score rows (one per metric) for one configuration, with provenance."""
    missing = [k for k in KEYS if k not in keys]
    if missing:
        raise ValueError(f"score keys missing {missing}")
    prov = provenance(settings)
    rows = [
        {
            **{k: keys[k] for k in KEYS},
            "metric": m,
            "value": float(v),
            "n_samples": n_samples,
            "n_failed": n_failed,
            **prov,
        }
        for m, v in metrics.items()
    ]
    return pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)


def efficiency_rows(measures: pd.DataFrame, keys: dict[str, str], settings: Any) -> pa.Table:
    """Long-format efficiency rows of one (model, ft, variant, task) with provenance.

    ``measures`` has ``measure``, ``value``, ``unit``, ``method``, ``note``, ``batch_size``,
    ``device``, ``simulated`` and ``kernel`` (as :func:`vlmopt.profiling.variant.profile_variant` returns).
    """
    missing = [k for k in KEYS if k not in keys]
    if missing:
        raise ValueError(f"efficiency keys missing {missing}")
    prov = provenance(settings)
    rows = [
        {**{k: keys[k] for k in KEYS}, **{c: row[c] for c in EFFICIENCY_SCHEMA.names if c in row}, **prov}
        for row in measures.to_dict("records")
    ]
    for row in rows:
        for column, value in row.items():
            if isinstance(value, float) and math.isnan(value):
                row[column] = None
    return pa.Table.from_pylist(rows, schema=EFFICIENCY_SCHEMA)


def summarise(
    scores: pd.DataFrame, manifests: Iterable[dict[str, Any]] = (), efficiency: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per (model, ft, variant, task, dataset) with metrics as columns, plus sizes from manifests.

    The :data:`SUMMARY_COUNTS` of each evaluation (``n_samples``, ``n_failed``) follow its metrics
    as integer columns (null where its score rows lack them), so a score computed on fewer
    readable images shows as such. With ``efficiency`` (long rows), the :data:`SUMMARY_MEASURES`
    of each (model, ft, variant, task) join as columns: the cost of every evaluated configuration
    beside its quality (its own profile; sweep points stay in the efficiency table), with the
    ``kernel`` its packed Linears ran on; ``simulated`` turns false where that profile ran every
    packed Linear on a low-bit kernel (its cost is measured, not the dense model's).
    """
    wide = scores.pivot_table(index=list(KEYS), columns="metric", values="value", aggfunc="first").reset_index()
    wide.columns.name = None
    clash = [c for c in SUMMARY_COUNTS if c in wide.columns]
    if clash:
        raise ValueError(f"metric name(s) {clash} clash with the summary's count columns")
    for column in SUMMARY_COUNTS:
        if column in scores.columns:
            # One value per evaluation (every metric row repeats it); the largest if rows disagree.
            counts = scores.groupby(list(KEYS))[column].max().astype("Int64").reset_index()
            wide = wide.merge(counts, on=list(KEYS), how="left")
        else:
            wide[column] = pd.array([None] * len(wide), dtype="Int64")
    sizes = pd.DataFrame(list(manifests))
    if not sizes.empty:
        wide = wide.merge(sizes, on=["model", "ft", "variant"], how="left")
    if efficiency is not None and "sweep_axis" in efficiency.columns:
        efficiency = efficiency[efficiency["sweep_axis"].isna()]
    if efficiency is not None and not efficiency.empty:
        keys = ["model", "ft", "variant", "task"]
        chosen = efficiency[efficiency["measure"].isin(SUMMARY_MEASURES)]
        cost = chosen.pivot_table(index=keys, columns="measure", values="value", aggfunc="first", dropna=False)
        cost = cost.reindex(columns=[m for m in SUMMARY_MEASURES if m in set(chosen["measure"])]).reset_index()
        cost.columns.name = None
        wide = wide.merge(cost, on=keys, how="left")
        if {"kernel", "simulated"} <= set(efficiency.columns):
            profiled = efficiency.groupby(keys)[["kernel", "simulated"]].first()
            wide = wide.merge(profiled.rename(columns={"simulated": "_profiled"}).reset_index(), on=keys, how="left")
            if "simulated" in wide.columns:
                # The cost columns are real where the profile ran every packed Linear on a kernel.
                ran = wide["_profiled"].astype("boolean").eq(False).fillna(False).astype(bool)
                wide.loc[ran, "simulated"] = False
            wide = wide.drop(columns="_profiled")
    return wide.sort_values(list(KEYS)).reset_index(drop=True)


def merge_shards(shards: list[pd.DataFrame], dataset: pd.DataFrame) -> pd.DataFrame:
    """Concatenate shard predictions in dataset order; raises if any sample is missing or duplicated."""
    merged = pd.concat(shards, ignore_index=True)
    dup = merged["sample_id"][merged["sample_id"].duplicated()]
    if len(dup):
        raise ValueError(f"{len(dup)} samples predicted twice across shards, e.g. {list(dup[:3])}")
    order = {sid: i for i, sid in enumerate(dataset["sample_id"])}
    missing = set(order) - set(merged["sample_id"])
    if missing:
        raise ValueError(f"{len(missing)} samples missing from the shards, e.g. {sorted(missing)[:3]}")
    extra = set(merged["sample_id"]) - set(order)
    if extra:
        raise ValueError(f"{len(extra)} predicted samples are not in the dataset, e.g. {sorted(extra)[:3]}")
    merged = merged.iloc[merged["sample_id"].map(order).argsort()].reset_index(drop=True)
    return merged


def size_columns(manifest: dict[str, Any]) -> dict[str, Any]:
    """The summary's size columns of a variant, from its manifest."""
    return {
        "method": variant_method(manifest),
        "size_bytes": manifest.get("serialized_size_bytes"),
        "nominal_size_bytes": manifest.get("nominal_size_bytes"),
        "nominal_bits": manifest.get("nominal_bits_per_parameter"),
        "representation": manifest.get("representation"),
        "simulated": manifest.get("simulated"),
        # How the folder stores the weights (pack-quantized or float) and its safetensors bytes.
        "storage": (manifest.get("storage") or {}).get("format"),
        "stored_bytes": (manifest.get("storage") or {}).get("weight_bytes"),
    }
