"""Image captioning: generated captions scored against several references with the COCO caption metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from vlmopt.tasks.base import Task, aligned

if TYPE_CHECKING:
    from vlmopt.models.base import FamilyAdapter

__all__ = ["CaptioningTask"]


class CaptioningTask(Task):
    name = "captioning"
    columns = ("references",)
    headline = "CIDEr"
    headline_label = "CIDEr"
    metrics = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
    truth_columns = ("references",)

    def prompts(self, df: pd.DataFrame, adapter: FamilyAdapter) -> list[str]:
        return [adapter.prompt(self.name)] * len(df)

    def targets(self, df: pd.DataFrame, epoch: int) -> list[str]:
        return [list(refs)[(epoch + i) % len(refs)] for i, refs in enumerate(df["references"])]

    def score(self, predictions: pd.DataFrame, table: pd.DataFrame, *, source: str = "") -> dict[str, float]:
        """pycocoevalcap's BLEU-1..4, METEOR, ROUGE-L and CIDEr (PTB tokenizer) of every caption."""
        from vlmopt.metrics import caption_scores

        data, pred = aligned(predictions, table, source)
        refs = {sid: list(r) for sid, r in zip(data.index, data["references"], strict=True)}
        return caption_scores(pred, refs)
