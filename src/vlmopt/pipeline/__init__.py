"""Stage functions: one call per pipeline stage, shared by the Snakemake scripts and the CLI.

Each function takes paths and plain settings (what a rule passes through ``params:``), does one
stage's work through the library, and writes its outputs atomically where they are single files.
"""

from __future__ import annotations

from vlmopt.pipeline.data import label_dataset, prepare_dataset
from vlmopt.pipeline.job import start_job
from vlmopt.pipeline.models import build_model, compress_loaded, compress_model, export_model, finetune_model
from vlmopt.pipeline.predict import gather_predictions, predict_shard, score_predictions
from vlmopt.pipeline.profile import profile_variant
from vlmopt.pipeline.results import build_figure, build_html_report, build_plots, build_tables

__all__ = [
    "build_figure",
    "build_html_report",
    "build_model",
    "build_plots",
    "build_tables",
    "compress_loaded",
    "compress_model",
    "export_model",
    "finetune_model",
    "gather_predictions",
    "label_dataset",
    "predict_shard",
    "prepare_dataset",
    "profile_variant",
    "score_predictions",
    "start_job",
]
