"""Finetuning: full finetuning with periodic checkpoints and resume after a killed job."""

from __future__ import annotations

from vlmopt.finetune.full import FullFinetuneConfig, finetune

__all__ = ["FullFinetuneConfig", "finetune"]
