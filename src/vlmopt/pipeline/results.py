"""Pipeline stages: tables, figures and the report."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from vlmopt.tables import summarise, write_parquet

__all__ = ["build_tables", "build_plots", "build_html_report", "build_figure"]


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
