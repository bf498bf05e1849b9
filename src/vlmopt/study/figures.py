"""The report's figures, listed once: what each shows, how it is drawn, and which studies get it.

:data:`FIGURES` is the one table of figures. The HTML report (:mod:`vlmopt.report`) draws and
captions them in its order, rule ``figure`` draws one each and Snakemake's report files them under
their category, and :func:`planned_figures` picks those a study will have data for. Planning reads
the study's settings only: nothing here imports matplotlib or torch (the drawing functions are
named, and :mod:`vlmopt.plots.draw` imports them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlmopt.study.runs import evaluations, swept
from vlmopt.tasks import TASKS, Task

__all__ = [
    "FIGURES",
    "PRUNING_METHODS",
    "QUANTIZERS",
    "Contents",
    "Figure",
    "figure_file",
    "planned_figures",
    "reads_classes",
]

#: Weight quantization methods with one bit width (the drop-off figures).
QUANTIZERS = ("uniform", "gptq", "awq")
#: Structural pruning methods (the pruning figure and table).
PRUNING_METHODS = ("prune_layers", "prune_heads")


def reads_classes(task: Task) -> bool:
    """Whether the task's generated answers are read as classes of its table's ``label_name`` (real vs
    generated): its scores count the answers per true class (the confusion matrices), and its examples
    show the class read beside the answer's text."""
    return task.generative and task.answers_are_classes


@dataclass(frozen=True)
class Contents:
    """What a study evaluates, as the figures' conditions read it (grids expanded)."""

    #: The tasks of its evaluations.
    tasks: frozenset[str]
    #: The steps of each evaluated variant, in variant name order.
    steps: tuple[tuple[dict[str, Any], ...], ...]
    #: Whether it has profiling sweep jobs.
    swept: bool

    @classmethod
    def of(cls, config: dict[str, Any]) -> Contents:
        evals = evaluations(config)
        variants = sorted({e.variant for e in evals})
        steps = tuple(tuple(config["variants"].get(v) or []) for v in variants)
        return cls(frozenset(e.task for e in evals), steps, bool(swept(config)))

    @property
    def methods(self) -> list[list[Any]]:
        """The methods of each evaluated variant's steps."""
        return [[step.get("method") for step in steps] for steps in self.steps]

    def has_task(self, wanted: Callable[[Task], bool]) -> bool:
        """Whether one of its (registered) tasks is ``wanted``."""
        return any(name in TASKS and wanted(TASKS[name]) for name in self.tasks)


def _always(study: Contents) -> bool:
    return True


def _single_quantization(study: Contents) -> bool:
    return any(len(m) == 1 and m[0] in QUANTIZERS for m in study.methods)


def _weight_quantization_only(study: Contents) -> bool:
    return any(
        steps and all(s.get("method") in QUANTIZERS and s.get("activation_bits") is None for s in steps)
        for steps in study.steps
    )


def _single_svd(study: Contents) -> bool:
    return any(m == ["svd"] for m in study.methods)


def _pruning(study: Contents) -> bool:
    return any(set(m) & set(PRUNING_METHODS) for m in study.methods)


def _class_answers(study: Contents) -> bool:
    return study.has_task(reads_classes)


def _generated_answers(study: Contents) -> bool:
    return study.has_task(lambda task: task.generative)


def _sweep(study: Contents) -> bool:
    return study.swept


@dataclass(frozen=True)
class Figure:
    """One figure of the report."""

    name: str
    #: What the figure shows and how to read it; the HTML report and Snakemake's report show it.
    caption: str
    #: Its section in Snakemake's report.
    category: str
    #: The function that draws it, ``"<module>.<function>"`` of :mod:`vlmopt.plots`, called with
    #: what ``inputs`` names and the output file.
    draw: str
    #: What it is drawn from, in argument order: tables by name (``summary``, ``variants``,
    #: ``efficiency``), or the ``predictions`` and ``data`` folders.
    inputs: tuple[str, ...]
    #: Whether a study (its :class:`Contents`) will have data for it.
    planned: Callable[[Contents], bool]
    #: The file type: ``png``, or ``html`` for an interactive page.
    suffix: str = "png"

    @property
    def file(self) -> str:
        """The file name: ``<name>.png``, or ``<name>.html`` for the interactive ones."""
        return f"{self.name}.{self.suffix}"


#: Every figure by name, in the report's order.
FIGURES: dict[str, Figure] = {
    f.name: f
    for f in (
        Figure(
            "quality_vs_size",
            "Quality against nominal size: the headline metric of each task against the size of the weights "
            "at their bit width. Colours are compression methods (the same in every figure), markers models, "
            "hollow markers not finetuned; every variant is labelled (points whose markers overlap share a "
            "label); the grey line is the Pareto front, baselines are ringed.",
            "Trade-offs",
            "static.quality_vs_size",
            ("summary",),
            _always,
        ),
        Figure(
            "quality_vs_cost",
            "Quality against each measured cost (latency, size, FLOPs, energy) with the Pareto front (grey "
            "line): the variants no other variant beats on both quality and that cost. Colours are compression "
            "methods, markers models; every variant is labelled (only the front's past 60 points in a panel). "
            "Baselines are ringed in black; simulated (fake-quantized) variants are pale with a dashed outline, "
            "since their latency and energy are the dense model's.",
            "Trade-offs",
            "tradeoffs.quality_vs_cost",
            ("summary",),
            _always,
        ),
        Figure(
            "quality_vs_bits",
            "Drop-off: quality against the weights' bit width, one line per model, quantizer, part and "
            "position (colour: quantizer; line style: part and position; marker: model); the dashed grey lines "
            "are the unquantized baselines.",
            "Quantization",
            "dropoff.quality_vs_bits",
            ("summary", "variants"),
            _single_quantization,
        ),
        Figure(
            "dropoff_3d",
            "The drop-off in three dimensions (interactive, opens in a browser): each weight-quantized variant "
            "at its bits of the vision encoder, the bridge and the language model (32 = not quantized), "
            "coloured by the headline metric; choose the task in the menu, drag to turn, hover for the variant.",
            "Quantization",
            "interactive.dropoff_3d",
            ("summary", "variants"),
            _weight_quantization_only,
            suffix="html",
        ),
        Figure(
            "svd",
            "Low-rank (SVD) variants: the headline metric (and top-5 for classification) against the ratio of "
            "parameters kept and the number of layers factorized, as a heat map (blank: not evaluated) and as "
            "lines, one per number of layers, with the unfactorized baseline dashed.",
            "Low rank",
            "svd.quality_vs_svd",
            ("summary", "variants"),
            _single_svd,
        ),
        Figure(
            "pruning",
            "Pruning variants next to their baseline: the headline metric, parameters (with the change from the "
            "baseline), latency per sample and FLOPs per sample, one bar per variant coloured by method; the "
            "dashed line marks the baseline's value.",
            "Pruning",
            "pruning.pruning_plot",
            ("summary", "variants", "efficiency"),
            _pruning,
        ),
        Figure(
            "task_bars",
            "The headline metric of every model, finetuning and variant, per task, coloured by compression method.",
            "Quality",
            "static.task_bars",
            ("summary",),
            _always,
        ),
        Figure(
            "confusion",
            "Real vs generated: what each classifier answered (columns) for real and generated test images "
            "(rows), as counts and shares of the true class; unparsed answers name neither class.",
            "Quality",
            "confusion.confusion_matrices",
            ("summary",),
            _class_answers,
        ),
        Figure(
            "examples",
            "Before and after: sample test images with the reference (caption, question and answer, or true "
            "class) and the output of the baseline and of chosen variants (the best and the worst compressed "
            "one by the headline metric) side by side; answers are marked right or wrong where a task has one "
            "answer. Images where the variants disagree come first.",
            "Quality",
            "examples.before_after",
            ("summary", "predictions", "data"),
            _generated_answers,
        ),
        Figure(
            "scaling",
            "The profiling sweep: latency, FLOPs (and energy, memory) per sample against image size, prompt "
            "length and batch size, and per dtype, attention implementation and torch.compile; colours here "
            "are the profiled models and variants.",
            "Efficiency",
            "scaling.scaling_curves",
            ("efficiency",),
            _sweep,
        ),
    )
}


def figure_file(name: str) -> str:
    """The file name of a figure: ``<name>.png``, or ``<name>.html`` for the interactive ones."""
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
    return FIGURES[name].file


def planned_figures(config: dict[str, Any]) -> list[str]:
    """The report's figures (rule ``figure``) that the study will have data for, judged from its
    settings (grids expanded), in the report's order: quality against size and cost and the task bars
    always; the drop-off with a single-step weight quantization, its 3-D view with variants of weight
    quantization only, SVD with a single SVD step, pruning with a layer- or head-pruning step, the
    confusion matrices with a task whose answers are read as classes (real vs generated), the
    before/after examples with a generative task, and the sweep's curves with a profiling sweep."""
    study = Contents.of(config)
    return [name for name, figure in FIGURES.items() if figure.planned(study)]
