"""Small encoding helpers shared by family adapters."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["first_eos_id", "pad_right", "pixel_values", "rgb_arrays", "text_batch", "text_ids"]


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (an empty string gives no ids)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def pad_right(sequences: list[list[int]], labels: list[list[int]] | None, *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad id lists into ``input_ids``/``attention_mask`` (and ``labels`` with -100)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        lab = torch.full((len(sequences), width), -100, dtype=torch.long)
        for i, s in enumerate(labels):
            lab[i, : len(s)] = torch.tensor(s)
        out["labels"] = lab
    return out


def pixel_values(processor: Any, images: list, dtype: torch.dtype) -> torch.Tensor:
    """Preprocess PIL images (or arrays) into a float tensor of the model's dtype."""
    return processor.image_processor(images=rgb_arrays(images), return_tensors="pt")["pixel_values"].to(dtype)


def rgb_arrays(images: list) -> list:
    """PIL images as RGB numpy arrays (arrays pass through), the input every image processor takes."""
    return [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else im for im in images]


def first_eos_id(loaded: Any) -> int:
    """The language model's end-of-sequence id (the first, if the config lists several), else the tokenizer's."""
    eos = loaded.model.config.text_config.eos_token_id
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def text_batch(tokenizer: Any, texts: list[str], *, max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` of whole texts with their special tokens.

    A text longer than ``max_length`` keeps its first tokens and its final special token, which
    encoders that pool at the end-of-text token need (as the CLIP and BERT tokenizers truncate).
    """
    sequences = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if len(ids) > max_length:
            ids = [*ids[: max_length - 1], ids[-1]]
        sequences.append(ids)
    return pad_right(sequences, None, pad_id=tokenizer.pad_token_id or 0)
