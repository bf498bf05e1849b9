"""CPU-only scoring of predictions against references, matching the official evaluation code.

``caption_scores`` computes the COCO caption metrics with pycocoevalcap (PTB tokenizer, BLEU, METEOR,
ROUGE-L, CIDEr), https://github.com/salaniz/pycocoevalcap; ``vqa_accuracy`` reproduces the official VQA
accuracy of https://github.com/GT-Vision-Lab/VQA; ``multiple_choice_accuracy`` scores ScienceQA-style
multiple-choice answers; ``retrieval_recall`` and ``topk_accuracy`` rank score
matrices as the BLIP / CLIP evaluations do. Nothing here loads a model: no torch, no transformers.
"""

from __future__ import annotations

from vlmopt.metrics.caption import (
    CAPTION_METRICS,
    CaptionEvaluation,
    caption_scores,
    caption_scores_per_sample,
    evaluate_captions,
)
from vlmopt.metrics.multiple_choice import choice_index, multiple_choice_accuracy
from vlmopt.metrics.retrieval import retrieval_recall, topk_accuracy
from vlmopt.metrics.vqa import exact_match_accuracy, vqa_accuracy
from vlmopt.metrics.wer import strip_prompt, word_error_rate

__all__ = [
    "CAPTION_METRICS",
    "CaptionEvaluation",
    "caption_scores",
    "caption_scores_per_sample",
    "choice_index",
    "evaluate_captions",
    "exact_match_accuracy",
    "multiple_choice_accuracy",
    "retrieval_recall",
    "strip_prompt",
    "topk_accuracy",
    "vqa_accuracy",
    "word_error_rate",
]
