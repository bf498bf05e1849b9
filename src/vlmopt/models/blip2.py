"""BLIP-2 (Li et al. 2023, https://arxiv.org/abs/2301.12597) with an OPT language model.

A frozen-style ViT, a Q-Former bridge whose learned query tokens cross-attend to the image, a
linear projection into the language model, and OPT as a decoder-only language model. The image
enters the language model as ``num_query_tokens`` copies of the image token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessorPil,
    OPTConfig,
)

from vlmopt.models.base import Encoded, FamilyAdapter, LoadedModel
from vlmopt.models.encoding import pad_right, pixel_values, text_ids
from vlmopt.models.tokenizer import train_word_tokenizer

__all__ = ["Blip2OptAdapter"]

NUM_QUERY_TOKENS_TINY = 8


class Blip2OptAdapter(FamilyAdapter):
    name = "blip2-opt"
    model_class = Blip2ForConditionalGeneration
    tasks = ("captioning", "vqa", "real_vs_generated")
    #: Patch side of the tiny model's vision encoder, in pixels.
    tiny_patch_size = 8
    # The published BLIP-2 zero-shot VQA prompt.
    prompts = {
        "captioning": "",
        "vqa": "Question: {question} Short answer:",
        "real_vs_generated": "Question: {question} Answer:",
    }

    def tiny_vision_and_bridge(self, image_size: int, vocab_size: int) -> tuple[Blip2VisionConfig, Blip2QFormerConfig]:
        """Configs of the tiny ViT and Q-Former, shared by every tiny BLIP-2 whatever its language model."""
        vision = Blip2VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=self.tiny_patch_size,
            # The vision config's default initializer range (1e-10) leaves a random ViT inert.
            initializer_range=0.02,
        )
        qformer = Blip2QFormerConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            encoder_hidden_size=32,
            cross_attention_frequency=1,
            vocab_size=vocab_size,
            # Measured on the shapes study: at the usual 0.02 the Q-Former's cross-attention is
            # uniform over the patches, almost no image signal reaches the language model, and
            # finetuning settles on the caption prior (one caption for every image). A sharper
            # initial attention lets the image path learn.
            initializer_range=0.3,
        )
        return vision, qformer

    def tiny(self, texts: list[str], *, seed: int = 0, image_size: int = 64) -> LoadedModel:
        tokenizer = train_word_tokenizer([*texts, self.prompts["vqa"]])
        image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        vision, qformer = self.tiny_vision_and_bridge(image_size, len(tokenizer))
        text = OPTConfig(
            vocab_size=len(tokenizer),
            hidden_size=48,
            ffn_dim=96,
            num_hidden_layers=3,
            num_attention_heads=2,
            word_embed_proj_dim=48,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        config = Blip2Config(
            vision_config=vision.to_dict(),
            qformer_config=qformer.to_dict(),
            text_config=text.to_dict(),
            num_query_tokens=NUM_QUERY_TOKENS_TINY,
            image_token_index=image_token_id,
            initializer_range=0.1,
        )
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config)
        # Query tokens start at zero after random init, which stalls training.
        with torch.no_grad():
            model.query_tokens.normal_(std=0.02)
        processor = Blip2Processor(
            image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
            tokenizer=tokenizer,
            num_query_tokens=NUM_QUERY_TOKENS_TINY,
        )
        return LoadedModel(model.eval(), processor, self.name, self, source="tiny:blip2-opt")

    def from_pretrained(self, source: str, **kwargs: Any) -> LoadedModel:
        model = Blip2ForConditionalGeneration.from_pretrained(source, **kwargs)
        processor = Blip2Processor.from_pretrained(source)
        return LoadedModel(model.eval(), processor, self.name, self, source=source)

    def parts(self, model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
        vision = model.vision_model.encoder.layers
        bridge = model.qformer.encoder.layer
        decoder = model.language_model.model.decoder.layers if hasattr(model.language_model, "model") else None
        if decoder is None:
            decoder = model.language_model.decoder.layers
            prefix = "language_model.decoder.layers"
        else:
            prefix = "language_model.model.decoder.layers"
        return {
            "vision": [(f"vision_model.encoder.layers.{i}", m) for i, m in enumerate(vision)],
            "bridge": [(f"qformer.encoder.layer.{i}", m) for i, m in enumerate(bridge)],
            "language": [(f"{prefix}.{i}", m) for i, m in enumerate(decoder)],
        }

    def encode(
        self, loaded: LoadedModel, images: list | None, prompts: list[str], targets: list[str] | None = None
    ) -> Encoded:
        tok = loaded.tokenizer
        config = loaded.model.config
        head = [config.image_token_index] * config.num_query_tokens + [config.text_config.bos_token_id]
        prompt_ids = [head + text_ids(tok, p) for p in prompts]
        if targets is None:
            sequences, labels = prompt_ids, None
        else:
            eos = config.text_config.eos_token_id
            sequences = [p + text_ids(tok, t) + [eos] for p, t in zip(prompt_ids, targets, strict=True)]
            labels = [[-100] * len(p) + s[len(p) :] for p, s in zip(prompt_ids, sequences, strict=True)]
        inputs = pad_right(sequences, labels, pad_id=tok.pad_token_id)
        if images is not None:
            inputs["pixel_values"] = pixel_values(loaded.processor, images, loaded.model.dtype)
        return Encoded(inputs, prompt_length=len(prompt_ids[0]))

    def generate(self, loaded: LoadedModel, encoded: Encoded, **generate_kwargs: Any) -> list[str]:
        text_config = loaded.model.config.text_config
        generate_kwargs.setdefault("eos_token_id", text_config.eos_token_id)
        generate_kwargs.setdefault("pad_token_id", text_config.pad_token_id)
        out = loaded.model.generate(**encoded.inputs, **generate_kwargs)
        return loaded.tokenizer.batch_decode(out[:, encoded.prompt_length :], skip_special_tokens=True)
