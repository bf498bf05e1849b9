"""BLIP image captioning (Li et al. 2022, https://arxiv.org/abs/2201.12086).

A ViT encoder and a BERT-style text decoder that cross-attends to it; there is no bridge. VQA is
run as prompted continuation of the captioning decoder ("question: ... answer:").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
    BlipProcessor,
    BlipTextConfig,
    BlipVisionConfig,
)

from vlmopt.models.base import Encoded, FamilyAdapter, LoadedModel
from vlmopt.models.encoding import pad_right, pixel_values, text_ids
from vlmopt.models.tokenizer import train_word_tokenizer

__all__ = ["BlipAdapter"]


class BlipAdapter(FamilyAdapter):
    name = "blip"
    # transformers 5.25: BLIP's generate fails with it (the static cache is sized one token short: index out of bounds).
    static_cache = False
    model_class = BlipForConditionalGeneration
    tasks = ("captioning", "vqa", "real_vs_generated")
    #: Patch side of the tiny model's vision encoder, in pixels.
    tiny_patch_size = 8
    prompts = {
        "captioning": "",
        "vqa": "question: {question} answer:",
        "real_vs_generated": "question: {question} answer:",
    }

    @classmethod
    def tiny_configs(cls, tokenizer: Any, image_size: int) -> tuple[BlipVisionConfig, BlipTextConfig]:
        """Vision and text configs of a tiny BLIP (captioning and retrieval models share them)."""
        vision = BlipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=cls.tiny_patch_size,
            # The vision config's default initializer range (1e-10) leaves a random ViT inert.
            initializer_range=0.02,
        )
        text = BlipTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=2,
            encoder_hidden_size=32,
            max_position_embeddings=64,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            sep_token_id=tokenizer.sep_token_id,
        )
        return vision, text

    def tiny(self, texts: list[str], *, seed: int = 0, image_size: int = 64) -> LoadedModel:
        tokenizer = train_word_tokenizer([*texts, self.prompts["vqa"]])
        vision, text = self.tiny_configs(tokenizer, image_size)
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text))
        processor = BlipProcessor(
            image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
            tokenizer=tokenizer,
        )
        return LoadedModel(model.eval(), processor, self.name, self, source="tiny:blip")

    def from_pretrained(self, source: str, **kwargs: Any) -> LoadedModel:
        model = BlipForConditionalGeneration.from_pretrained(source, **kwargs)
        processor = BlipProcessor.from_pretrained(source)
        return LoadedModel(model.eval(), processor, self.name, self, source=source)

    def parts(self, model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
        vision = model.vision_model.encoder.layers
        language = model.text_decoder.bert.encoder.layer
        return {
            "vision": [(f"vision_model.encoder.layers.{i}", m) for i, m in enumerate(vision)],
            "bridge": [],
            "language": [(f"text_decoder.bert.encoder.layer.{i}", m) for i, m in enumerate(language)],
        }

    def encode(
        self, loaded: LoadedModel, images: list | None, prompts: list[str], targets: list[str] | None = None
    ) -> Encoded:
        tok = loaded.tokenizer
        bos, sep = loaded.model.config.text_config.bos_token_id, loaded.model.config.text_config.sep_token_id
        prompt_ids = [[bos, *text_ids(tok, p)] for p in prompts]
        if targets is None:
            # generate() drops the last id (it expects a trailing [SEP]), so add one.
            sequences = [ids + [sep] for ids in prompt_ids]
            labels = None
        else:
            sequences = [p + text_ids(tok, t) + [sep] for p, t in zip(prompt_ids, targets, strict=True)]
            labels = [[-100] * len(p) + s[len(p) :] for p, s in zip(prompt_ids, sequences, strict=True)]
        inputs = pad_right(sequences, labels, pad_id=tok.pad_token_id)
        if images is not None:
            inputs["pixel_values"] = pixel_values(loaded.processor, images, loaded.model.dtype)
        return Encoded(inputs, prompt_length=len(prompt_ids[0]))

    def generate(self, loaded: LoadedModel, encoded: Encoded, **generate_kwargs: Any) -> list[str]:
        out = loaded.model.generate(**encoded.inputs, **generate_kwargs)
        return loaded.tokenizer.batch_decode(out[:, encoded.prompt_length :], skip_special_tokens=True)
