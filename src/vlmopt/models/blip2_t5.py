"""BLIP-2 (Li et al. 2023, https://arxiv.org/abs/2301.12597) with a Flan-T5 language model.

The vision encoder and the Q-Former bridge are those of :mod:`vlmopt.models.blip2`; the language
model is the encoder-decoder Flan-T5 (Chung et al. 2022, https://arxiv.org/abs/2210.11416), as in
the ``Salesforce/blip2-flan-t5-xl`` checkpoint. The ``num_query_tokens`` projected query outputs
replace as many image tokens at the start of the T5 *encoder* input, followed by the prompt and
``</s>`` (what the T5 tokenizer appends); the target goes to the *decoder*, which T5 starts from
its ``decoder_start_token_id`` (the pad token) by shifting the labels right.

The ``language`` part lists the T5 encoder blocks and then the decoder blocks, as one list: both
stacks are the language model (the prompt is read by the encoder, the answer written by the
decoder), a compression step on ``part: language`` is meant to reach both, and the order is the
order in which a token's information flows through them. Positions (thirds) therefore count over
encoder and decoder blocks together. The blocks sit in two layer lists
(``language_model.encoder.block`` and ``language_model.decoder.block``); ``prune_layers`` splits
its indices between them and keeps each stack's relative position bias.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessorPil,
    T5Config,
)

from vlmopt.models.base import Encoded, LoadedModel
from vlmopt.models.blip2 import NUM_QUERY_TOKENS_TINY, Blip2OptAdapter
from vlmopt.models.encoding import pad_right, pixel_values, text_ids
from vlmopt.models.tokenizer import train_word_tokenizer

__all__ = ["Blip2T5Adapter"]


class Blip2T5Adapter(Blip2OptAdapter):
    """BLIP-2 Flan-T5; loading (``from_pretrained``), tasks and prompts are those of BLIP-2 OPT."""

    name = "blip2-t5"
    tasks = ("captioning", "vqa", "real_vs_generated")
    # The published BLIP-2 zero-shot VQA prompt for the Flan-T5 models (Li et al. 2023, zero-shot VQA:
    # "Question: {} Short answer:"), the one blip2.py uses too; captioning has no prompt.
    prompts = {
        "captioning": "",
        "vqa": "Question: {question} Short answer:",
        "real_vs_generated": "Question: {question} Answer:",
    }
    #: Encoder and decoder blocks of the tiny model's T5. Equal, as in Flan-T5: transformers 5.23
    #: cannot generate with a T5 whose decoder has more blocks than its encoder (the KV cache is
    #: sized by ``num_layers``, the encoder's count, and decoding fails with an IndexError).
    tiny_encoder_layers = 2
    tiny_decoder_layers = 2

    def tiny(self, texts: list[str], *, seed: int = 0, image_size: int = 64) -> LoadedModel:
        tokenizer = train_word_tokenizer([*texts, self.prompts["vqa"]])
        image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        vision, qformer = self.tiny_vision_and_bridge(image_size, len(tokenizer))
        text = T5Config(
            vocab_size=len(tokenizer),
            d_model=48,
            d_kv=24,
            d_ff=96,
            num_layers=self.tiny_encoder_layers,
            num_decoder_layers=self.tiny_decoder_layers,
            num_heads=2,
            # Flan-T5 is T5 v1.1: gated-GELU feed-forward, untied head without output scaling.
            # transformers 5 always ties lm_head to the shared embedding when building from a
            # config; tie_word_embeddings=False only turns the d_model**-0.5 output scaling off.
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            # Measured on shapes captions (32 images, 150 AdamW steps, lr 2e-3, three seeds): at
            # T5's own scale (1.0) the image often never reaches the decoder (the loss with
            # shuffled images equals the loss with the right ones); at 0.5 it does (0.2-0.35
            # against 1.0-1.4 shuffled). 0.25 fails again.
            initializer_factor=0.5,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
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
        with torch.no_grad():
            # Query tokens start at zero after random init, which stalls training.
            model.query_tokens.normal_(std=0.02)
            # T5 initialises the (tied) embedding with std 1, which without output scaling makes
            # the initial logits ~sqrt(d_model) wide; d_model**-0.5 gives unit-scale logits.
            model.language_model.shared.weight.normal_(std=text.d_model**-0.5)
        processor = Blip2Processor(
            image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
            tokenizer=tokenizer,
            num_query_tokens=NUM_QUERY_TOKENS_TINY,
        )
        return LoadedModel(model.eval(), processor, self.name, self, source="tiny:blip2-t5")

    def parts(self, model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
        vision = model.vision_model.encoder.layers
        bridge = model.qformer.encoder.layer
        encoder = model.language_model.encoder.block
        decoder = model.language_model.decoder.block
        return {
            "vision": [(f"vision_model.encoder.layers.{i}", m) for i, m in enumerate(vision)],
            "bridge": [(f"qformer.encoder.layer.{i}", m) for i, m in enumerate(bridge)],
            "language": [(f"language_model.encoder.block.{i}", m) for i, m in enumerate(encoder)]
            + [(f"language_model.decoder.block.{i}", m) for i, m in enumerate(decoder)],
        }

    def encode(
        self, loaded: LoadedModel, images: list | None, prompts: list[str], targets: list[str] | None = None
    ) -> Encoded:
        """Encoder ids (image tokens, prompt, ``</s>``); with ``targets``, decoder ids and labels too.

        ``input_ids`` are the encoder's and ``prompt_length`` is their (unpadded) length; the
        decoder starts from its start token, so ``generate`` returns new text only. With targets,
        ``decoder_input_ids`` (the labels shifted right, as T5 does) are given explicitly, so that
        a forward pass without ``labels`` (calibration) still runs the decoder on the target.
        """
        tok = loaded.tokenizer
        config = loaded.model.config
        text_config = config.text_config
        eos = text_config.eos_token_id
        head = [config.image_token_index] * config.num_query_tokens
        prompt_ids = [head + text_ids(tok, p) + [eos] for p in prompts]
        inputs = pad_right(prompt_ids, None, pad_id=tok.pad_token_id)
        if targets is not None:
            target_ids = [text_ids(tok, t) + [eos] for t in targets]
            start = [text_config.decoder_start_token_id]
            decoder = pad_right([start + t[:-1] for t in target_ids], target_ids, pad_id=text_config.pad_token_id)
            inputs["decoder_input_ids"] = decoder["input_ids"]
            inputs["decoder_attention_mask"] = decoder["attention_mask"]
            inputs["labels"] = decoder["labels"]
        if images is not None:
            inputs["pixel_values"] = pixel_values(loaded.processor, images, loaded.model.dtype)
        return Encoded(inputs, prompt_length=len(prompt_ids[0]))

    def generate(self, loaded: LoadedModel, encoded: Encoded, **generate_kwargs: Any) -> list[str]:
        text_config = loaded.model.config.text_config
        generate_kwargs.setdefault("eos_token_id", text_config.eos_token_id)
        generate_kwargs.setdefault("pad_token_id", text_config.pad_token_id)
        generate_kwargs.setdefault("decoder_start_token_id", text_config.decoder_start_token_id)
        inputs = {k: v for k, v in encoded.inputs.items() if k not in ("labels", "decoder_input_ids")}
        inputs.pop("decoder_attention_mask", None)
        out = loaded.model.generate(**inputs, **generate_kwargs)
        # The language model is an encoder-decoder: the output is the decoder's ids, which start
        # with the decoder start token; the prompt is not in it.
        return loaded.tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
