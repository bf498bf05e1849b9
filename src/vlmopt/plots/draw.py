"""Drawing one figure of :data:`vlmopt.study.figures.FIGURES` from a study's tables.

The table names each figure's drawing function as ``"<module>.<function>"`` of this package; the
modules are imported here by name, so that a figure job's code digest (:mod:`vlmopt.code_digest`)
covers every one of them.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from vlmopt.plots import confusion, dropoff, examples, interactive, pruning, scaling, static, svd, tradeoffs
from vlmopt.plots.style import _save, plt
from vlmopt.study import FIGURES

__all__ = ["TABLES", "draw", "drawing", "load", "placeholder"]

#: The result tables figures are drawn from (``<name>.parquet`` in the tables folder).
TABLES = ("summary", "variants", "efficiency", "scores")

_MODULES = {
    module.__name__.rpartition(".")[2]: module
    for module in (confusion, dropoff, examples, interactive, pruning, scaling, static, svd, tradeoffs)
}


def drawing(name: str) -> Callable[..., Path]:
    """The function that draws figure ``name``: called with its inputs (in the table's order) and the output file."""
    module, function = FIGURES[name].draw.split(".")
    return getattr(_MODULES[module], function)


def _read(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.is_file() else None


def load(tables: Path, predictions: str | Path | None, data: str | Path | None) -> dict[str, Any]:
    """What the figures are drawn from: the tables (None where missing) and the folders of the
    predictions (default: beside the tables folder) and of the prepared datasets."""
    loaded: dict[str, Any] = {name: _read(tables / f"{name}.parquet") for name in TABLES}
    loaded["predictions"] = Path(predictions) if predictions is not None else tables.parent / "predictions"
    loaded["data"] = Path(data) if data is not None else Path("resources/data")
    return loaded


def draw(name: str, loaded: dict[str, Any], out: Path) -> Path:
    """Draw figure ``name`` from ``loaded`` (:func:`load`) into ``out``; ValueError (naming why) when
    there is nothing to draw."""
    needs = FIGURES[name].inputs
    absent = [t for t in needs if loaded.get(t) is None]
    if absent:
        raise ValueError(f"no {absent[0]} (expected {absent[0]}.parquet or folder) for this figure")
    return drawing(name)(*(loaded[t] for t in needs), out)


def placeholder(name: str, reason: str, out: Path) -> Path:
    """A figure file that says it has nothing to show, and why."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".html":
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(name)}</title></head>"
            f"<body><p>{html.escape(name)}: no data in this study ({html.escape(reason)}).</p></body></html>",
            encoding="utf-8",
        )
        tmp.replace(out)
        return out
    fig, ax = plt.subplots(figsize=(6, 1.2))
    ax.axis("off")
    ax.text(0.0, 0.5, f"{name}: no data in this study\n{reason}", va="center", fontsize=9, wrap=True)
    return _save(fig, out)
