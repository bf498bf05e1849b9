"""Sample test images with the answers of a model before and after compression, side by side.

Each block of the figure is one generative task (captioning, VQA, real vs generated) on one dataset,
for the model and finetuning with the most compressed variants. The block's title names them and the
variants shown: the uncompressed baseline, the compressed variant with the best headline metric and
the one with the worst. Below each image (its sample id above it) is first the truth -- the first
reference caption, the question and its majority human answer, or the true class -- then each
variant's answer under its name, with a square in the colour of its compression method (the same
colour as in the other figures). For VQA and real vs generated an answer is marked right (✓, blue)
or wrong (✗, orange): a VQA answer is right when it equals the majority answer after the official
VQA answer normalisation; a real-vs-generated answer is the class read from the generated text by
the scorer's rule ("unparsed" when it names neither class), shown with the text it was read from.
Images where the variants answer differently come first, so the figure shows what compression
changed; the remaining places are filled in sample order. "(no prediction)" marks a sample the
variant did not answer (missing from its predictions, or failed).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from vlmopt.plots.example_picks import answers_by_sample, pick_examples, pick_samples, selection_title
from vlmopt.plots.style import _save, method_colour, plt
from vlmopt.study import reads_classes
from vlmopt.tasks import GENERATIVE_TASKS, TASKS, Task, majority_answer
from vlmopt.tasks.base import cell_strings

__all__ = ["before_after", "example_figure", "pick_examples", "pick_samples"]

log = logging.getLogger(__name__)


_NO_PREDICTION = "(no prediction)"
_RIGHT, _WRONG = "#0072B2", "#D55E00"  # Okabe-Ito blue and vermillion, told apart by the marks too
_TEXT, _MUTED = "#222222", "#666666"

# Layout, in inches (sizes) and points (fonts, line advance).
_FONT = 8.0
_TITLE_FONT = 10.0
_LINE = 1.35 * _FONT  # advance of one text line at _FONT
_TITLE_LINE = 1.35 * _TITLE_FONT
_GAP = 4.0  # between two entries under an image
_COL = 2.5  # width of one image column
_PAD = 0.1  # inner padding of a column
_IMAGE = 1.8  # height of the image row
_SID = 0.2  # sample id above the image
_MARGIN = 0.15
_SWATCH = 0.14  # room for the method square before a variant's name
_MAX_LINES = {"truth": 4, "answer": 4, "text": 3, "header": 2}


@dataclass
class _Part:
    lines: list[str]
    colour: str = _TEXT
    bold: bool = False
    swatch: str | None = None  # method colour of a variant's name


@dataclass
class _Column:
    sample_id: str
    image: np.ndarray | None
    parts: list[list[_Part]] = field(default_factory=list)  # entries: truth, then one per variant

    def height(self) -> float:
        """Height (points) of the text under the image."""
        return sum(sum(len(p.lines) for p in entry) * _LINE + _GAP for entry in self.parts)


@dataclass
class _Block:
    title: list[str]
    note: list[str]
    columns: list[_Column]

    @property
    def width(self) -> float:
        """Width (inches): the columns, and room for the title when there are fewer than three."""
        return 2 * _MARGIN + _COL * max(len(self.columns), 3)

    def height(self) -> float:
        title = (len(self.title) * _TITLE_LINE + len(self.note) * _LINE + _GAP) / 72
        text = max((c.height() for c in self.columns), default=0.0) / 72
        return _MARGIN + title + _SID + _IMAGE + 1.5 * _PAD + text + _MARGIN


# --- text --------------------------------------------------------------------------------------------------


@functools.cache
def _renderer() -> Any:
    from matplotlib.backends.backend_agg import RendererAgg

    return RendererAgg(1, 1, 72)  # at 72 dpi one pixel is one point


@functools.cache
def _width(text: str, size: float, bold: bool) -> float:
    """Width of ``text`` in points."""
    from matplotlib.font_manager import FontProperties

    prop = FontProperties(size=size, weight="bold" if bold else "normal")
    return _renderer().get_text_width_height_descent(text, prop, ismath=False)[0]


def _wrap(
    text: str, width: float, max_lines: int, *, size: float = _FONT, bold: bool = False, name: bool = False
) -> list[str]:
    """Lines of ``text`` no wider than ``width`` points (measured), at most ``max_lines``, the last cut
    with an ellipsis when the text is longer. Words wider than a line are split. A ``name`` (a variant:
    no spaces) is broken after its ``-``, ``+``, ``_`` and ``/`` instead of at spaces."""
    words = re.findall(r"[^-+_/]*[-+_/]|[^-+_/]+", text) if name else text.split()
    sep = "" if name else " "
    space = _width(sep, size, bold) if sep else 0.0
    lines: list[str] = []
    line, used = "", 0.0
    for word in words:
        w = _width(word, size, bold)
        if line and used + space + w <= width:
            line, used = f"{line}{sep}{word}", used + space + w
            continue
        if line:
            lines.append(line)
        while w > width:  # split a word that does not fit on a line of its own
            cut = max([1] + [i for i in range(1, len(word)) if _width(word[:i], size, bold) <= width])
            lines.append(word[:cut])
            word = word[cut:]
            w = _width(word, size, bold)
        line, used = word, w
    if line or not lines:
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and _width(last + " …", size, bold) > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + " …"]
    return lines


_TEXT_WIDTH = (_COL - 2 * _PAD) * 72


def _truth(task: Task, row: pd.Series) -> list[_Part]:
    """The truth shown under an image, as the task's truth columns hold it: reference captions (the
    first shown), a question with its human answers (the majority answer shown), or a true class."""
    width = _TEXT_WIDTH
    if "references" in task.truth_columns:
        refs = cell_strings(row["references"])
        header = f"reference (1 of {len(refs)})" if len(refs) > 1 else "reference"
        body = _wrap(refs[0] if refs else "(none)", width, _MAX_LINES["truth"])
    elif "answers" in task.truth_columns:
        header = "question · majority answer"
        body = _wrap(f"Q: {row['question']}", width, _MAX_LINES["truth"] - 1)
        body += _wrap(f"A: {majority_answer(cell_strings(row['answers']))}", width, 1)
    else:
        header = "true class"
        body = [str(row[c]) for c in task.truth_columns]
    return [_Part([header], bold=True), _Part(body)]


def _prediction(task: Task, variant: str, method: str | None, text: str | None, row: pd.Series) -> list[_Part]:
    """A variant's answer under its name: marked right or wrong where the task judges answers, with
    the class read from it where the task reads classes (the text it was read from below, quoted)."""
    header = _Part(
        _wrap(variant, _TEXT_WIDTH - _SWATCH * 72, _MAX_LINES["header"], bold=True, name=True),
        bold=True,
        swatch=method_colour(method),
    )
    if text is None:
        return [header, _Part([_NO_PREDICTION], colour=_MUTED)]
    shown = text.strip() or "(empty answer)"
    right = task.judge(text, row)
    if right is None:
        return [header, _Part(_wrap(shown, _TEXT_WIDTH, _MAX_LINES["answer"]))]
    mark, colour = ("✓", _RIGHT) if right else ("✗", _WRONG)
    if not reads_classes(task):
        return [header, _Part(_wrap(f"{mark} {shown}", _TEXT_WIDTH, _MAX_LINES["answer"]), colour)]
    return [
        header,
        _Part([f"{mark} {task.answer_key(text)}"], colour),
        _Part(_wrap(f"“{shown}”", _TEXT_WIDTH, _MAX_LINES["text"]), _MUTED),
    ]


def _note(task: Task) -> str:
    squares = "■ colour of the variant's compression method"
    return f"{squares}; ✓ right / ✗ wrong: {task.judge_rule}" if task.judge_rule else squares


# --- drawing -----------------------------------------------------------------------------------------------


def _image(path: Path) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((384, 384))
            return np.asarray(img)
    except (OSError, ValueError) as exc:
        log.warning("cannot read image %s: %s", path, exc)
        return None


def _block(
    test: pd.DataFrame,
    image_root: Path,
    predictions: Mapping[str, pd.DataFrame],
    task: str,
    n: int,
    title: str,
    methods: Mapping[str, Any] | None,
) -> _Block:
    if task not in TASKS or not TASKS[task].generative:
        raise ValueError(f"task {task!r} has no generated answers to show (one of {', '.join(GENERATIVE_TASKS)})")
    spec = TASKS[task]
    if not predictions:
        raise ValueError(f"no predictions to show for {task}")
    missing = [c for c in ("sample_id", "image", *spec.truth_columns) if c not in test.columns]
    if missing:
        raise ValueError(f"the {task} test split has no column {', '.join(missing)}")
    if test.empty or n < 1:
        raise ValueError(f"no {task} test samples to show")
    ids = pick_samples(test, predictions, task, n)
    rows = test.assign(sample_id=test["sample_id"].astype(str)).drop_duplicates("sample_id").set_index("sample_id")
    answers = {v: answers_by_sample(p) for v, p in predictions.items()}
    methods = methods or {}
    columns = []
    for sid in ids:
        row = rows.loc[sid]
        column = _Column(sid, _image(Path(image_root) / str(row["image"])))
        column.parts.append(_truth(spec, row))
        for variant, by_id in answers.items():
            method = methods.get(variant, "none" if variant == "baseline" else variant)
            column.parts.append(_prediction(spec, variant, method, by_id.get(sid), row))
        columns.append(column)
    width = _COL * max(len(columns), 3) * 72
    heading = title or f"{task}: {', '.join(predictions)}"
    return _Block(
        _wrap(heading, width, 3, size=_TITLE_FONT, bold=True),
        _wrap(_note(spec), width, 2),
        columns,
    )


def _text(fig: plt.Figure, x: float, y: float, part: _Part, size: float = _FONT) -> None:
    """Text with its top left corner ``x``, ``y`` inches from the figure's bottom left corner."""
    # In figure fractions, not inches (dpi_scale_trans): saving with a tight box shifts the former only.
    fig_w, fig_h = fig.get_size_inches()
    fig.text(
        x / fig_w,
        y / fig_h,
        "\n".join(part.lines),
        ha="left",
        va="top",
        fontsize=size,
        color=part.colour,
        fontweight="bold" if part.bold else "normal",
        parse_math=False,
    )


def _draw(fig: plt.Figure, block: _Block, top: float) -> None:
    """Draw ``block`` into ``fig`` with its top edge ``top`` inches above the figure's bottom."""
    fig_w, fig_h = fig.get_size_inches()
    y = top - _MARGIN
    _text(fig, _MARGIN, y, _Part(block.title, bold=True), size=_TITLE_FONT)
    y -= len(block.title) * _TITLE_LINE / 72
    _text(fig, _MARGIN, y, _Part(block.note, colour=_MUTED))
    y -= (len(block.note) * _LINE + _GAP) / 72
    image_bottom = y - _SID - _IMAGE
    for j, column in enumerate(block.columns):
        x = _MARGIN + j * _COL
        ax = fig.add_axes(((x + _PAD / 2) / fig_w, image_bottom / fig_h, (_COL - _PAD) / fig_w, _IMAGE / fig_h))
        ax.set_axis_off()
        ax.set_anchor("N")  # images top-aligned, so the sample ids above them line up
        ax.set_title(column.sample_id, fontsize=7, color=_MUTED, pad=3)
        if column.image is None:
            ax.text(0.5, 0.5, "(image missing)", ha="center", va="center", fontsize=_FONT, color=_MUTED)
        else:
            small = max(column.image.shape[:2]) <= 128
            ax.imshow(column.image, interpolation="nearest" if small else "antialiased")
        cursor = image_bottom - 1.5 * _PAD
        for entry in column.parts:
            for part in entry:
                left = x + _PAD
                if part.swatch is not None:
                    _text(fig, left, cursor, _Part(["■"], colour=part.swatch))
                    left += _SWATCH
                _text(fig, left, cursor, part)
                cursor -= len(part.lines) * _LINE / 72
            cursor -= _GAP / 72


def example_figure(
    test: pd.DataFrame,
    image_root: Path,
    predictions: dict[str, pd.DataFrame],
    task: str,
    *,
    n: int = 6,
    title: str = "",
    methods: Mapping[str, str] | None = None,
) -> plt.Figure:
    """``n`` test images side by side, each with the truth and every variant's answer below it.

    ``predictions`` maps a variant name to its predictions (sample_id, prediction, error), in the
    order to show them; ``methods`` maps a variant to its compression method for the colour of its
    square (default: "none" for "baseline", else the variant name). ``image_root`` is the folder the
    test split's ``image`` paths are relative to. Samples are chosen by :func:`pick_samples`.
    """
    block = _block(test, Path(image_root), predictions, task, n, title, methods)
    height = block.height()
    fig = plt.figure(figsize=(block.width, height))
    _draw(fig, block, height)
    return fig


def before_after(
    summary: pd.DataFrame,
    predictions_root: str | Path,
    data_root: str | Path,
    out: str | Path,
    *,
    n: int = 6,
    selections: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """One PNG with an :func:`example_figure` block per selection (default :func:`pick_examples`).

    Test splits are read from ``<data_root>/<dataset>/test.parquet`` (images relative to that folder),
    predictions from ``<predictions_root>/<model>/<ft>/<variant>/<task>/<dataset>/predictions.parquet``.
    A variant without a predictions file is left out, a selection without its test split or any
    predictions is skipped (both with a warning); raises ValueError when no selection can be drawn.
    """
    predictions_root, data_root = Path(predictions_root), Path(data_root)
    if selections is None:
        selections = pick_examples(summary)
    if not selections:
        raise ValueError(
            f"summary has no generative task ({', '.join(GENERATIVE_TASKS)}) with a headline metric to show"
        )
    blocks: list[_Block] = []
    skipped: list[str] = []
    for sel in selections:
        task, dataset, model, ft = (str(sel[k]) for k in ("task", "dataset", "model", "ft"))
        name = f"{model}/{ft} {task} on {dataset}"
        split = data_root / dataset / "test.parquet"
        if not split.is_file():
            log.warning("before/after examples skip %s: no test split %s", name, split)
            skipped.append(f"{name}: no {split}")
            continue
        predictions: dict[str, pd.DataFrame] = {}
        for variant in sel["variants"]:
            path = predictions_root / model / ft / str(variant) / task / dataset / "predictions.parquet"
            if path.is_file():
                predictions[str(variant)] = pd.read_parquet(path)
            else:
                log.warning("before/after examples leave out %s of %s: no %s", variant, name, path)
        if not predictions:
            wanted = ", ".join(map(str, sel["variants"]))
            log.warning("before/after examples skip %s: no predictions of %s", name, wanted)
            skipped.append(f"{name}: no predictions")
            continue
        rows = summary[(summary["model"] == model) & (summary["ft"] == ft) & (summary["task"] == task)]
        methods = dict(zip(rows["variant"].astype(str), rows["method"], strict=True)) if "method" in rows else {}
        title = selection_title(sel, rows, predictions)
        try:
            block = _block(pd.read_parquet(split), split.parent, predictions, task, n, title, methods)
        except ValueError as exc:
            log.warning("before/after examples skip %s: %s", name, exc)
            skipped.append(f"{name}: {exc}")
            continue
        blocks.append(block)
    if not blocks:
        raise ValueError("no before/after examples could be drawn: " + "; ".join(skipped))
    heights = [b.height() for b in blocks]
    total = sum(heights)
    fig = plt.figure(figsize=(max(b.width for b in blocks), total))
    top = total
    for i, (block, height) in enumerate(zip(blocks, heights, strict=True)):
        if i:  # a rule between two blocks
            fig.add_artist(Line2D([0.005, 0.995], [top / total] * 2, color="#BBBBBB", linewidth=0.8))
        _draw(fig, block, top)
        top -= height
    return _save(fig, out)
