"""LLaVA-1.5 (Liu et al. 2023, https://arxiv.org/abs/2310.03744): a CLIP ViT, an MLP projector and Llama.

The CLIP vision tower encodes the image; the hidden states of its ``vision_feature_layer`` (the
penultimate layer, -2, in LLaVA-1.5), without the CLS token under the ``"default"`` feature
select strategy, pass through ``multi_modal_projector`` (two Linears with a GELU) and replace the
``<image>`` placeholder tokens of the prompt, one token per patch. Llama is a decoder-only
language model that reads the prompt with the image tokens inlined.

There is no bridge of transformer layers: the projector's ``linear_1`` and ``linear_2`` sit
outside every listed layer, so a compression step reaches them only by naming them in
``modules`` (``model.multi_modal_projector.linear_1``). Vision layers after
``vision_feature_layer`` (the last one, with -2) are computed but feed nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from vlmopt.models.base import Encoded, FamilyAdapter, LoadedModel
from vlmopt.models.encoding import first_eos_id, pad_right, pixel_values, text_ids
from vlmopt.models.tokenizer import train_word_tokenizer

__all__ = ["LlavaAdapter", "num_image_tokens"]


def num_image_tokens(config: Any) -> int:
    """Image tokens in the prompt: one per patch, plus CLS under the ``"full"`` feature strategy."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if config.vision_feature_select_strategy == "full" else 0)


class LlavaAdapter(FamilyAdapter):
    name = "llava"
    model_class = LlavaForConditionalGeneration
    tasks = ("captioning", "vqa", "real_vs_generated")
    #: Patch side of the tiny model's vision encoder, in pixels.
    tiny_patch_size = 8
    # The LLaVA-1.5 conversation format ("USER: <image>\n... ASSISTANT:", as in the llava-hf model
    # cards). VQA: the published LLaVA-1.5 short-answer prompt (the paper's response-format prompt
    # for short-answer VQA). Captioning: "Describe the image concisely.", the first of LLaVA's
    # brief-description instructions (Liu et al. 2023, https://arxiv.org/abs/2304.08485, used for
    # its stage-1 caption data), in the same conversation format.
    prompts = {
        "captioning": "USER: <image>\nDescribe the image concisely. ASSISTANT:",
        "vqa": "USER: <image>\n{question}\nAnswer the question using a single word or phrase. ASSISTANT:",
        # Free-form: the answer states the label and may describe and justify it.
        "real_vs_generated": "USER: <image>\n{question} ASSISTANT:",
    }

    def tiny(self, texts: list[str], *, seed: int = 0, image_size: int = 64) -> LoadedModel:
        tokenizer = train_word_tokenizer([*texts, *self.prompts.values()])
        image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=self.tiny_patch_size,
        )
        text = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        config = LlavaConfig(
            vision_config=vision.to_dict(),
            text_config=text.to_dict(),
            image_token_index=image_token_id,
            # LLaVA-1.5's defaults, spelled out: the penultimate vision layer, CLS dropped.
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_seq_length=(image_size // self.tiny_patch_size) ** 2,
        )
        assert config.image_seq_length == num_image_tokens(config)
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessorPil(
                size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
            ),
            tokenizer=tokenizer,
            patch_size=self.tiny_patch_size,
            vision_feature_select_strategy="default",
            # The CLS token, which the "default" strategy drops again.
            num_additional_image_tokens=1,
        )
        return LoadedModel(model.eval(), processor, self.name, self, source="tiny:llava")

    def from_pretrained(self, source: str, **kwargs: Any) -> LoadedModel:
        model = LlavaForConditionalGeneration.from_pretrained(source, **kwargs)
        processor = LlavaProcessor.from_pretrained(source)
        return LoadedModel(model.eval(), processor, self.name, self, source=source)

    def parts(self, model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
        tower = model.model.vision_tower
        # transformers 5 builds a bare CLIPVisionModel (no inner ``vision_model``); accept both.
        if hasattr(tower, "vision_model"):
            vision, vision_prefix = tower.vision_model.encoder.layers, "model.vision_tower.vision_model.encoder.layers"
        else:
            vision, vision_prefix = tower.encoder.layers, "model.vision_tower.encoder.layers"
        language = model.model.language_model.layers
        return {
            "vision": [(f"{vision_prefix}.{i}", m) for i, m in enumerate(vision)],
            "bridge": [],
            "language": [(f"model.language_model.layers.{i}", m) for i, m in enumerate(language)],
        }

    def encode(
        self, loaded: LoadedModel, images: list | None, prompts: list[str], targets: list[str] | None = None
    ) -> Encoded:
        tok = loaded.tokenizer
        config = loaded.model.config
        image_id, n_image = config.image_token_index, num_image_tokens(config)
        prompt_ids = []
        for p in prompts:
            ids = text_ids(tok, p)
            if ids.count(image_id) != 1:
                raise ValueError(f"a LLaVA prompt needs exactly one <image> placeholder, got {p!r}")
            at = ids.index(image_id)
            prompt_ids.append([config.text_config.bos_token_id, *ids[:at], *[image_id] * n_image, *ids[at + 1 :]])
        if targets is None:
            sequences, labels = prompt_ids, None
        else:
            eos = first_eos_id(loaded)
            sequences = [p + text_ids(tok, t) + [eos] for p, t in zip(prompt_ids, targets, strict=True)]
            labels = [[-100] * len(p) + s[len(p) :] for p, s in zip(prompt_ids, sequences, strict=True)]
        inputs = pad_right(sequences, labels, pad_id=self._pad_id(loaded))
        if images is not None:
            inputs["pixel_values"] = pixel_values(loaded.processor, images, loaded.model.dtype)
        return Encoded(inputs, prompt_length=len(prompt_ids[0]))

    def generate(self, loaded: LoadedModel, encoded: Encoded, **generate_kwargs: Any) -> list[str]:
        generate_kwargs.setdefault("eos_token_id", first_eos_id(loaded))
        generate_kwargs.setdefault("pad_token_id", self._pad_id(loaded))
        out = loaded.model.generate(**encoded.inputs, **generate_kwargs)
        return loaded.tokenizer.batch_decode(out[:, encoded.prompt_length :], skip_special_tokens=True)

    @staticmethod
    def _pad_id(loaded: LoadedModel) -> int:
        # llava-hf checkpoints keep the pad id (32001) on the top-level config, not on text_config.
        for pad in (
            loaded.model.config.text_config.pad_token_id,
            getattr(loaded.model.config, "pad_token_id", None),
            loaded.tokenizer.pad_token_id,
        ):
            if pad is not None:
                return pad
        return first_eos_id(loaded)
