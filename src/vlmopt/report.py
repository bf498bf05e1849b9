"""A study's report as one self-contained HTML page, from its result tables only.

:func:`build_report` draws every figure the tables have data for (figures embedded as PNG data,
so the page is one file that opens offline), adds a sortable table of every evaluated
configuration with its key metrics and costs, the best configuration under size, latency and
energy budgets, and where the numbers came from: the commit and library versions recorded in the
score rows, and the study file. The tables themselves are copied beside the page (CSV and
Parquet) and linked. ``vlmopt report --tables results/tables --out DIR`` runs it.
"""

from __future__ import annotations

import base64
import html
import logging
import numbers
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from vlmopt.study import FIGURES, figure_file
from vlmopt.tasks import TASKS

log = logging.getLogger(__name__)

__all__ = ["budget_limits", "build_report", "draw_figure", "figure_file", "variant_table"]

#: Fractions of the most expensive baseline's cost that the budget tables use by default.
BUDGET_FRACTIONS = (0.25, 0.5, 1.0)
#: Costs the budget tables limit, with how they are shown.
BUDGETS = {
    "nominal_size_bytes": ("nominal size", 1e-6, "MB"),
    "latency_ms_per_sample_p50": ("latency per sample", 1.0, "ms"),
    "energy_j_per_sample": ("energy per sample", 1.0, "J"),
}
#: Columns of the variant table, in order, when the summary has them.
TABLE_COLUMNS = (
    "model",
    "ft",
    "variant",
    "method",
    "task",
    "dataset",
    "metric",
    "value",
    "n_samples",
    "n_failed",
    "nominal_size_bytes",
    "size_bytes",
    "stored_bytes",
    "simulated",
    "storage",
    "kernel",
    "latency_ms_per_sample_p50",
    "energy_j_per_sample",
    "gflops_per_sample",
    "decode_bandwidth_fraction",
    "prefill_compute_fraction",
)


#: Headers (with units) of the variant table's columns that need them.
TABLE_HEADERS = {
    "nominal_size_bytes": "nominal size (MB)",
    "size_bytes": "file size (MB)",
    "stored_bytes": "stored weights (MB)",
    "latency_ms_per_sample_p50": "latency (ms/sample)",
    "energy_j_per_sample": "energy (J/sample)",
    "gflops_per_sample": "GFLOP/sample",
    "decode_bandwidth_fraction": "decode bandwidth / peak",
    "prefill_compute_fraction": "prefill FLOP/s / peak",
}


def draw_figure(
    name: str,
    tables: str | Path,
    out: str | Path,
    *,
    predictions: str | Path | None = None,
    data: str | Path | None = None,
) -> Path:
    """Draw figure ``name`` from the tables in ``tables`` into the file ``out`` (rule ``figure``).

    A figure the tables turn out to have no data for (the study planned it from its settings, but,
    say, every score of those variants is missing) is still written, as a page that says why, so
    that the rest of the study's outputs stand; the reason is logged as a warning.
    """
    from vlmopt.plots.draw import draw, load, placeholder

    tables, out = Path(tables), Path(out)
    loaded = load(tables, predictions, data)
    try:
        return draw(name, loaded, out)
    except ValueError as exc:
        log.warning("figure %s has no data: %s", name, exc)
        return placeholder(name, str(exc), out)


def variant_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluated configuration: keys, method, the task's headline metric, its sample counts
    (``n_samples``, and ``n_failed`` whose image could not be read) and the costs."""
    rows = summary[summary["task"].isin(TASKS)].copy()
    rows["metric"] = rows["task"].map(lambda t: TASKS[t].headline)
    rows["value"] = [
        r[m] if m in rows.columns else None for (_, r), m in zip(rows.iterrows(), rows["metric"], strict=True)
    ]
    columns = [c for c in TABLE_COLUMNS if c in rows.columns]
    table = rows[columns].sort_values(["task", "dataset", "model", "ft", "variant"]).reset_index(drop=True)
    for column in ("nominal_size_bytes", "size_bytes", "stored_bytes"):
        if column in table:
            table[column] = table[column] / 1e6
    return table.rename(columns=TABLE_HEADERS)


def budget_limits(summary: pd.DataFrame, fractions: Iterable[float] = BUDGET_FRACTIONS) -> dict[str, list[float]]:
    """Default budgets: fractions of the most expensive baseline's cost, for each cost with values."""
    limits: dict[str, list[float]] = {}
    baselines = summary[summary["variant"] == "baseline"]
    for cost in BUDGETS:
        if cost in summary.columns and baselines[cost].notna().any():
            top = float(baselines[cost].max())
            limits[cost] = [top * f for f in fractions]
    return limits


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _cell(value: Any) -> tuple[str, str, str]:
    """(text shown, sort key, class) of one table cell."""
    if value is None or value is pd.NA or (isinstance(value, float) and pd.isna(value)):
        return "", "", ""
    if isinstance(value, bool):
        return ("yes" if value else "no"), str(int(value)), ""
    if isinstance(value, numbers.Real):  # numpy integers too (nullable integer columns yield them)
        text = f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
        return text, repr(float(value)), "num"
    return html.escape(str(value)), html.escape(str(value)), ""


def _html_table(df: pd.DataFrame, table_id: str) -> str:
    head = "".join(f"<th onclick=\"sortTable('{table_id}', {i})\">{html.escape(c)}</th>" for i, c in enumerate(df))
    body = []
    for row in df.itertuples(index=False):
        cells = "".join(f'<td class="{cls}" data-sort="{key}">{text}</td>' for text, key, cls in map(_cell, row))
        body.append(f"<tr>{cells}</tr>")
    rows = "".join(body)
    table = f'<table id="{table_id}" class="sortable"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
    # A wide table scrolls sideways inside the page instead of running past its edge.
    return f'<div class="scroll">{table}</div>'


_SCRIPT = """
window.addEventListener("load", () => {
  const shown = Array.from(document.images).filter((img) => img.complete && img.naturalWidth > 0);
  document.body.dataset.imagesLoaded = shown.length;
});
function sortTable(id, column) {
  const table = document.getElementById(id);
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const ascending = table.dataset.column == column ? table.dataset.order != "asc" : true;
  const key = (row) => row.cells[column].dataset.sort;
  const numeric = rows.every((row) => key(row) === "" || !isNaN(parseFloat(key(row))));
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === "" || y === "") return (x === "") - (y === "");
    const order = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
    return ascending ? order : -order;
  });
  rows.forEach((row) => body.appendChild(row));
  table.dataset.column = column;
  table.dataset.order = ascending ? "asc" : "desc";
}
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; cursor: zoom-in; }
figure img.full { max-width: none; cursor: zoom-out; }
figcaption { font-size: 0.9em; color: #444; max-width: 60em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; }
th { background: #f2f2f2; cursor: pointer; } td { white-space: nowrap; } td.num { text-align: right; }
div.scroll { overflow-x: auto; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
"""


def build_report(
    tables: str | Path,
    out: str | Path,
    *,
    config: dict[str, Any] | None = None,
    budgets: dict[str, list[float]] | None = None,
    title: str | None = None,
    predictions: str | Path | None = None,
    data: str | Path | None = None,
    drawn: dict[str, str | Path] | None = None,
) -> Path:
    """Write ``out/index.html`` (and the tables beside it) from the tables in ``tables``; return the page.

    ``config`` is the study (shown as YAML); ``budgets`` maps a cost column to its limits
    (default :func:`budget_limits`). ``predictions`` and ``data`` are the folders of the predictions
    and of the prepared datasets, for the before/after examples (default: ``predictions`` beside
    ``tables``, and ``resources/data``). A figure the tables have no data for is left out and named.
    The interactive 3-D drop-off is a page of its own beside the report, linked from it.
    ``drawn`` maps figure names to files already drawn (by rule ``figure``), which are used as they
    are instead of being drawn again.
    """
    from vlmopt.plots.budget import best_under_budget
    from vlmopt.plots.draw import TABLES, draw, load

    tables, out = Path(tables), Path(out)
    loaded = load(tables, predictions, data)
    summary = loaded["summary"]
    if summary is None:
        raise FileNotFoundError(f"{tables / 'summary.parquet'} does not exist: run the tables stage first")
    out.mkdir(parents=True, exist_ok=True)
    sections, missing = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, figure in FIGURES.items():
            caption, kind = figure.caption, figure.suffix
            target = (out if kind == "html" else Path(tmp)) / figure_file(name)
            try:
                if drawn and name in drawn:
                    path = Path(drawn[name])
                    if kind == "html":
                        path = Path(shutil.copyfile(path, target))
                else:
                    path = draw(name, loaded, target)
            except ValueError as exc:  # the plot functions' "nothing to draw"
                missing.append(f"{name}: {exc}")
                log.info("report leaves out %s: %s", name, exc)
                if kind == "html":
                    target.unlink(missing_ok=True)  # a page from an earlier report with data
                continue
            if kind == "html":
                sections.append(
                    f'<figure id="fig-{name}"><p><a href="{path.name}">{html.escape(path.name)}</a> '
                    f"(interactive, {path.stat().st_size / 1e6:.1f} MB, works offline)</p>"
                    f"<figcaption><b>{name}</b>: {html.escape(caption)}</figcaption></figure>"
                )
                continue
            # Wide figures are shrunk to the page; a click shows one at full size (scrolling sideways).
            sections.append(
                f'<figure id="fig-{name}"><div class="scroll"><img src="{_png(path)}" alt="{name}" '
                f'title="click: full size / fit to the page" onclick="this.classList.toggle(\'full\')"></div>'
                f"<figcaption><b>{name}</b>: {html.escape(caption)}</figcaption></figure>"
            )
    pruning_html = _pruning_section(loaded)
    table = variant_table(summary)
    table.to_csv(out / "configurations.csv", index=False)
    for name in TABLES:
        if (tables / f"{name}.parquet").is_file():
            shutil.copy2(tables / f"{name}.parquet", out / f"{name}.parquet")
    budget_html = []
    for cost, limits in (budgets if budgets is not None else budget_limits(summary)).items():
        label, scale, unit = BUDGETS.get(cost, (cost, 1.0, ""))
        frames = [best_under_budget(summary, cost, limit) for limit in limits]
        if not frames:
            continue
        best = pd.concat(frames, ignore_index=True)
        best["limit"] = best["limit"] * scale
        best["cost_value"] = best["cost_value"] * scale
        best = best.rename(columns={"limit": f"at most ({unit})", "cost_value": f"{label} ({unit})"})
        shown = [c for c in best.columns if c not in ("cost", "metric", "n_total")]
        budget_html.append(f"<h3>{html.escape(label)}</h3>" + _html_table(best[shown], f"budget-{cost}"))
    provenance = _provenance(loaded["scores"])
    config_text = html.escape(_yaml(config)) if config else "(not given)"
    study = (config or {}).get("study") or tables.resolve().parent.parent.name
    n_variants = len(summary[["model", "ft", "variant"]].drop_duplicates())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title or f"vlmopt report: {study}")}</title>
<style>{_STYLE}</style><script>{_SCRIPT}</script></head>
<body>
<h1>{html.escape(title or f"vlmopt report: {study}")}</h1>
<p>{len(table)} evaluated configurations ({n_variants} model variants) on {summary["task"].nunique()} tasks.
Tables: <a href="configurations.csv">configurations.csv</a> (the table below),
<a href="summary.parquet">summary.parquet</a>{_links(out)}.</p>
<h2>Figures</h2>
<p>Click a figure to see it at full size.</p>
{"".join(sections)}
{_missing(missing)}
<h2>Every configuration</h2>
<p>Click a column to sort. <code>value</code> is the task's headline <code>metric</code>, computed on
<code>n_samples</code> samples, <code>n_failed</code> of which had an image that could not be read; the nominal size
counts each weight at its bit width, the file size is what is saved. Simulated variants keep the dense
model's latency (their weights are fake-quantized in float tensors).</p>
{_html_table(table, "variants")}
{pruning_html}
<h2>Best configuration under a budget</h2>
<p>Per task, the configuration with the best headline metric whose cost is at most the limit
(limits: {", ".join(f"{f:g}" for f in BUDGET_FRACTIONS)} of the most expensive baseline's cost, unless given);
<code>n_within</code> counts the configurations within it.</p>
{"".join(budget_html) or "<p>No cost column has values.</p>"}
<h2>Provenance</h2>
{provenance}
<h3>Study</h3><pre>{config_text}</pre>
</body></html>
"""
    index = out / "index.html"
    tmp_index = out / ".index.html.tmp"
    tmp_index.write_text(page, encoding="utf-8")
    tmp_index.replace(index)
    return index


def _pruning_section(loaded: dict[str, Any]) -> str:
    """The pruning variants' tables (metrics, parameters, latency, FLOPs), one per task, where the
    study has any."""
    from vlmopt.plots.pruning import pruning_table

    if loaded.get("variants") is None:
        return ""
    table = pruning_table(loaded["summary"], loaded["variants"], loaded.get("efficiency"))
    if table.empty:
        return ""
    headers = {
        "params_change": "params change (%)",
        "latency_ms_per_sample_p50": "latency (ms/sample)",
        "gflops_per_sample": "GFLOP/sample",
    }
    parts = [
        "<h2>Pruning</h2><p>Each pruning variant next to its baseline: the task's metrics, parameters "
        "(and their change from the baseline), latency and FLOPs per sample.</p>"
    ]
    for (task, dataset), rows in table.groupby(["task", "dataset"], sort=False):
        rows = rows.drop(columns=["task", "dataset"]).dropna(axis=1, how="all")
        parts.append(
            f"<h3>{html.escape(str(task))} ({html.escape(str(dataset))})</h3>"
            + _html_table(rows.rename(columns=headers), f"pruning-{task}-{dataset}")
        )
    return "".join(parts)


def _links(out: Path) -> str:
    return "".join(
        f', <a href="{name}.parquet">{name}.parquet</a>'
        for name in ("variants", "efficiency", "scores")
        if (out / f"{name}.parquet").is_file()
    )


def _missing(missing: list[str]) -> str:
    if not missing:
        return ""
    items = "".join(f"<li>{html.escape(m)}</li>" for m in missing)
    return f"<p>Figures without data in this study:</p><ul>{items}</ul>"


def _provenance(scores: pd.DataFrame | None) -> str:
    if scores is None or scores.empty:
        return "<p>No score rows.</p>"
    columns = [c for c in ("git_sha", "vlmopt_version", "torch_version", "transformers_version") if c in scores]
    seen = scores[columns].drop_duplicates()
    first, last = scores["created_at"].min(), scores["created_at"].max()
    return f"<p>Scores written between {html.escape(str(first))} and {html.escape(str(last))} by:</p>" + _html_table(
        seen, "provenance"
    )


def _yaml(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)
