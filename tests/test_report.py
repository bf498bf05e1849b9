"""The HTML report (vlmopt.report) from small synthetic result tables, and in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from vlmopt.cli import main
from vlmopt.report import build_report
from vlmopt.study import FIGURES
from vlmopt.tables import EFFICIENCY_SCHEMA, STEPS_SCHEMA, write_parquet

MODELS = ("a", "b")
VARIANTS = {"baseline": None, "w8": 8, "w4": 4}


def _tables(folder: Path, *, sweep: bool = True, steps: bool = True) -> Path:
    summary, variants, efficiency, scores = [], [], [], []
    for m, model in enumerate(MODELS):
        for variant, bits in VARIANTS.items():
            size = 4e6 * (m + 1) * (bits or 32) / 32
            keys = {"model": model, "ft": "none", "variant": variant}
            method = "uniform" if bits else "none"
            variants.append({**keys, "step": 0 if bits else -1, "method": method, "bits": bits, "part": "language"})
            for task, metric in (("captioning", "CIDEr"), ("vqa", "vqa_accuracy")):
                quality = 50.0 + 10 * m - (8 - (bits or 8)) * 2
                summary.append(
                    {
                        **keys,
                        "task": task,
                        "dataset": "d",
                        metric: quality,
                        "n_samples": 100,
                        # One evaluation had 3 images that could not be read.
                        "n_failed": 3 if (model, variant, task) == ("b", "w4", "vqa") else 0,
                        "method": method,
                        "nominal_size_bytes": size,
                        "size_bytes": 4e6 * (m + 1),
                        "simulated": bits is not None,
                        "latency_ms_per_sample_p50": 10.0 * (m + 1),
                        "gflops_per_sample": 0.5 * (m + 1),
                        "energy_j_per_sample": None,
                    }
                )
                scores.append(
                    {**keys, "task": task, "dataset": "d", "metric": metric, "value": quality, "git_sha": "abc123"}
                )
                for measure, value in (("latency_ms_per_sample_p50", 10.0), ("gflops_per_sample", 0.5)):
                    efficiency.append({**keys, "task": task, "dataset": "d", "measure": measure, "value": value})
                    if sweep and variant == "baseline":
                        for b in (1, 4):
                            efficiency.append(
                                {
                                    **keys,
                                    "task": task,
                                    "dataset": "d",
                                    "measure": measure,
                                    "value": value / b,
                                    "sweep_axis": "batch_size",
                                    "sweep_value": str(b),
                                }
                            )
    # Model a also has two SVD variants (ratio 0.5 in 1 or 2 layers) and a pruned one.
    for variant, step in {
        "svd-n1": {"method": "svd", "ratio": 0.5, "n_layers": 1, "part": "vision"},
        "svd-n2": {"method": "svd", "ratio": 0.5, "n_layers": 2, "part": "vision"},
        "prune": {"method": "prune_layers", "drop_last": 1, "part": "language"},
    }.items():
        keys = {"model": "a", "ft": "none", "variant": variant}
        variants.append({**keys, "step": 0, **step})
        summary.append(
            {**keys, "task": "captioning", "dataset": "d", "CIDEr": 40.0, "method": step["method"]}
            | {"nominal_size_bytes": 3e6, "size_bytes": 3e6, "simulated": False}
            | {"latency_ms_per_sample_p50": 8.0, "gflops_per_sample": 0.4}
        )
        scores.append({**keys, "task": "captioning", "dataset": "d", "metric": "CIDEr", "value": 40.0})
    for variant, params in (("baseline", 1e6), ("prune", 8e5)):
        efficiency.append(
            {"model": "a", "ft": "none", "variant": variant, "task": "captioning", "dataset": "d"}
            | {"measure": "params", "value": params}
        )
    # A real-vs-generated classifier with its confusion counts.
    cm = {"cm_real_as_real": 9, "cm_real_as_generated": 1, "cm_generated_as_generated": 10}
    keys = {"model": "a", "ft": "realgen", "variant": "baseline", "task": "real_vs_generated", "dataset": "g"}
    summary.append({**keys, "accuracy": 95.0, "method": "none", **cm})
    scores.append({**keys, "metric": "accuracy", "value": 95.0, "git_sha": "abc123"})
    scores = (
        pd.DataFrame(scores)
        .assign(git_sha="abc123")
        .assign(
            vlmopt_version="0.1.0", torch_version="2.x", transformers_version="5.x", created_at="2026-01-01T00:00:00"
        )
    )
    write_parquet(pa.Table.from_pandas(pd.DataFrame(summary), preserve_index=False), folder / "summary.parquet")
    write_parquet(pa.Table.from_pandas(scores, preserve_index=False), folder / "scores.parquet")
    efficiency = pd.DataFrame(efficiency).reindex(columns=EFFICIENCY_SCHEMA.names)
    write_parquet(
        pa.Table.from_pandas(efficiency, schema=EFFICIENCY_SCHEMA, preserve_index=False), folder / "efficiency.parquet"
    )
    if steps:
        rows = pd.DataFrame(variants).reindex(columns=STEPS_SCHEMA.names)
        write_parquet(
            pa.Table.from_pandas(rows, schema=STEPS_SCHEMA, preserve_index=False), folder / "variants.parquet"
        )
    return folder


def _examples(root: Path, write_predictions) -> tuple[Path, Path]:
    """A test split of dataset d (three 16 x 16 images with references) and captions of model a's
    variants; returns the predictions and data folders."""
    from PIL import Image

    data = root / "data"
    (data / "d" / "images").mkdir(parents=True)
    rows = []
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (16, 16), colour).save(data / "d" / "images" / f"{i}.png")
        rows.append({"sample_id": f"s{i}", "image": f"images/{i}.png", "references": [f"a {colour} square"]})
    pd.DataFrame(rows).to_parquet(data / "d" / "test.parquet")
    predictions = root / "predictions"
    for variant in (*VARIANTS, "svd-n1", "svd-n2", "prune"):
        texts = [f"{variant} says {c}" for c in ("red", "green", "blue")]
        frame = pd.DataFrame({"sample_id": ["s0", "s1", "s2"], "prediction": texts, "error": [None] * 3})
        write_predictions(predictions, "a", "none", variant, "captioning", "d", frame)
    return predictions, data


@pytest.fixture(scope="module")
def report(tmp_path_factory, write_predictions):
    tables = _tables(tmp_path_factory.mktemp("tables"))
    predictions, data = _examples(tmp_path_factory.mktemp("outputs"), write_predictions)
    return build_report(
        tables,
        tmp_path_factory.mktemp("report"),
        config={"study": "synthetic", "seed": 0},
        predictions=predictions,
        data=data,
    )


#: The figures embedded as PNG (the 3-D drop-off is a page of its own, linked).
PNGS = [name for name in FIGURES if name != "dropoff_3d"]


def test_report_has_every_figure_table_and_provenance(report):
    page = report.read_text()
    for name in FIGURES:
        assert f'id="fig-{name}"' in page, name
    assert page.count("data:image/png;base64,") == len(PNGS)
    assert "Figures without data" not in page
    assert 'href="dropoff_3d.html"' in page and (report.parent / "dropoff_3d.html").stat().st_size > 1_000_000
    # Every configuration: 2 models x 3 variants x 2 tasks, a's 3 more, and the classifier.
    table = pd.read_csv(report.parent / "configurations.csv")
    assert len(table) == 16 and sum(r["model"] == "a" for r in _html_rows(page, "variants")) == 10
    # The pruning table: a's baseline and its pruned variant, parameters 20 % fewer.
    pruning = _html_rows(page, "pruning-captioning-d")
    assert [(r["variant"], float(r["params"]), round(float(r["params change (%)"]), 6)) for r in pruning] == [
        ("baseline", 1e6, 0.0),
        ("prune", 8e5, -20.0),
    ]
    assert list(table.columns[:8]) == ["model", "ft", "variant", "method", "task", "dataset", "metric", "value"]
    assert "nominal size (MB)" in table.columns and table["nominal size (MB)"].max() == pytest.approx(8.0)
    # Each configuration's sample counts, in the page's table and the CSV beside it.
    assert list(table.columns[8:10]) == ["n_samples", "n_failed"]
    shown = {(r["model"], r["variant"], r["task"]): r for r in _html_rows(page, "variants")}
    assert shown[("b", "w4", "vqa")]["n_failed"] == "3.0" and shown[("b", "w4", "vqa")]["n_samples"] == "100.0"
    assert shown[("a", "w4", "vqa")]["n_failed"] == "0.0" and shown[("a", "prune", "captioning")]["n_failed"] == ""
    assert table["n_failed"].sum() == 3
    for name in ("summary", "variants", "efficiency", "scores"):
        assert (report.parent / f"{name}.parquet").is_file() and f'href="{name}.parquet"' in page
    # Budgets: 0.25, 0.5 and 1 x the most expensive baseline (b's, 8 MB). Within 4 MB the best is
    # b's w8 (2 MB, as good as b's baseline); within 2 MB too; within 8 MB b's baseline ties with
    # its w8 and the cheaper w8 wins.
    budget = _html_rows(page, "budget-nominal_size_bytes")
    assert len(budget) == 9  # 3 limits x 3 tasks
    captions = [r for r in budget if r["task"] != "real_vs_generated"]
    assert {(r["at most (MB)"], r["model"], r["variant"], r["value"]) for r in captions} == {
        ("2.0", "b", "w8", "60.0"),
        ("4.0", "b", "w8", "60.0"),
        ("8.0", "b", "w8", "60.0"),
    }
    assert {r["n_within"] for r in captions if r["at most (MB)"] == "2.0"} == {"4.0"}
    # No energy values: no energy budget table.
    assert 'id="budget-energy_j_per_sample"' not in page
    assert "abc123" in page and "study: synthetic" in page


def _html_rows(page: str, table_id: str) -> list[dict[str, str]]:
    """The rows of one table of the page as {header: sort key}."""
    table = re.search(rf'<table id="{table_id}".*?</table>', page, re.S).group(0)
    headers = re.findall(r"<th(?:\s[^>]*)?>(.*?)</th>", table)
    rows = re.findall(r"<tr>(<td.*?)</tr>", table)
    return [dict(zip(headers, re.findall(r'data-sort="([^"]*)"', r), strict=True)) for r in rows]


def test_figures_without_data_are_named(tmp_path):
    tables = _tables(tmp_path / "tables", sweep=False, steps=False)
    page = build_report(tables, tmp_path / "report").read_text()
    assert 'id="fig-scaling"' not in page and 'id="fig-quality_vs_bits"' not in page
    assert "scaling: the efficiency table has no sweep rows" in page
    assert "quality_vs_bits: no variants (expected variants.parquet" in page
    # No predictions beside these tables: the examples are named too.
    assert "examples: no before/after examples could be drawn" in page
    with pytest.raises(FileNotFoundError, match="summary.parquet does not exist"):
        build_report(tmp_path / "nowhere", tmp_path / "report")


def test_report_command(tmp_path, capsys):
    tables = _tables(tmp_path / "tables")
    study = tmp_path / "study.yaml"
    study.write_text("study: from-a-file\n")
    out = tmp_path / "out"
    args = ["report", "--tables", str(tables), "--out", str(out), "--config", str(study)]
    assert main([*args, "--budget", "latency_ms_per_sample_p50=15"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    page = (out / "index.html").read_text()
    assert "study: from-a-file" in page and 'id="budget-latency_ms_per_sample_p50"' in page
    assert 'id="budget-nominal_size_bytes"' not in page
    with pytest.raises(SystemExit, match="unknown cost 'latency'"):
        main([*args, "--budget", "latency=3"])


# --- in a real browser ---------------------------------------------------------------------------


def _chromium() -> str | None:
    """Debian's chromium, installed with apt-get where missing and possible; None if it cannot be had."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found or os.environ.get("VLMOPT_BROWSER_TEST", "1") == "0":
        return found
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    if subprocess.run(install, capture_output=True, timeout=900).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=900)
        subprocess.run(install, capture_output=True, timeout=900)
    return shutil.which("chromium")


def _headless(common: list[str], url: str, budget_ms: int) -> tuple[str, list[str]]:
    """The page's DOM after loading it in headless Chromium, and the console lines it logged."""
    loaded = subprocess.run(
        [*common, "--enable-logging=stderr", "--v=0", f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    # Console messages of the page (errors, uncaught exceptions) appear as CONSOLE lines.
    return loaded.stdout, [line for line in loaded.stderr.splitlines() if ":CONSOLE" in line]


def test_report_loads_in_headless_chromium(report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip(
            "no chromium, and it cannot be installed here (needs root and apt-get; VLMOPT_BROWSER_TEST=0 skips)"
        )
    url = report.resolve().as_uri()
    common = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"]
    dom, console = _headless(common, url, 5000)
    assert not console, console
    for name in FIGURES:
        assert f'id="fig-{name}"' in dom, name
    # The page's own load handler counts the images the browser decoded.
    assert f'data-images-loaded="{len(PNGS)}"' in dom
    shot = tmp_path / "report.png"
    taken = subprocess.run(
        [*common, "--window-size=1400,3000", f"--screenshot={shot}", url], capture_output=True, text=True, timeout=180
    )
    assert taken.returncode == 0 and shot.stat().st_size > 50_000, taken.stderr[-3000:]
    print(f"screenshot: {shot}")


def test_interactive_dropoff_renders_in_headless_chromium(report):
    """The 3-D drop-off page draws its WebGL scene offline (software rendering), without console errors."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium, and it cannot be installed here")
    url = (report.parent / "dropoff_3d.html").resolve().as_uri()
    common = [browser, "--headless=new", "--no-sandbox", "--hide-scrollbars", "--no-first-run"]
    common += ["--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
    dom, console = _headless(common, url, 8000)
    # Chromium's advice on plotly's canvas reads (a performance hint of the browser's own) is the one
    # console line allowed; any message of the page (an error, an exception) fails.
    advice = "Canvas2D: Multiple readback operations using getImageData are faster"
    assert not [line for line in console if advice not in line], console
    # Plotly replaced the empty div with its plot: a 3-D scene (gl-container) and the menus.
    assert "js-plotly-plot" in dom and "gl-container" in dom and "updatemenu" in dom


def test_figures_already_drawn_are_embedded_as_they_are(tmp_path):
    import base64

    tables = _tables(tmp_path / "tables", sweep=False, steps=False)
    # A drawn task_bars file (any PNG): its bytes are what the page embeds, not a new drawing.
    drawn = tmp_path / "plots" / "task_bars.png"
    drawn.parent.mkdir()
    from vlmopt.plots.style import _save, plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.text(0.5, 0.5, "drawn before")
    _save(fig, drawn)
    page = build_report(tables, tmp_path / "report", drawn={"task_bars": drawn}).read_text()
    assert base64.b64encode(drawn.read_bytes()).decode() in page
    assert 'id="fig-quality_vs_size"' in page  # the others are still drawn
