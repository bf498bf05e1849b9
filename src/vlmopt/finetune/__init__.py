"""Finetuning: full finetuning with periodic checkpoints and resume after a killed job.

The settings (:class:`~vlmopt.finetune.config.FullFinetuneConfig`) are importable without the
training code; :func:`vlmopt.finetune.full.finetune` runs a training.
"""

from __future__ import annotations

from vlmopt.finetune.config import FullFinetuneConfig

__all__ = ["FullFinetuneConfig"]
