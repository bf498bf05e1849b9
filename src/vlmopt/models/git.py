"""GIT, the Generative Image-to-text Transformer (Wang et al. 2022, https://arxiv.org/abs/2205.14100).

A CLIP ViT image encoder, a visual projection (one Linear + LayerNorm, not a transformer layer, so
there is no bridge part) and a BERT-style text decoder that runs over the projected image tokens
and the text as one sequence: image tokens attend to each other, text attends to the image and
causally to earlier text. Captioning starts from ``[CLS]`` alone; VQA puts the question after
``[CLS]`` and generates the answer as its continuation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import CLIPImageProcessorPil, GitConfig, GitForCausalLM, GitProcessor, GitVisionConfig

from vlmopt.models.base import Encoded, FamilyAdapter, LoadedModel
from vlmopt.models.encoding import pad_right, pixel_values, text_ids
from vlmopt.models.tokenizer import train_word_tokenizer

__all__ = ["GitAdapter"]


class GitAdapter(FamilyAdapter):
    name = "git"
    # transformers 5.25: GIT's generate fails with it (its image-token prefix and the static cache's mask do not match).
    static_cache = False
    model_class = GitForCausalLM
    tasks = ("captioning", "vqa", "real_vs_generated")
    #: Patch side of the tiny model's vision encoder, in pixels.
    tiny_patch_size = 8
    # The published GIT format (microsoft/GenerativeImage2Text, generativeimage2text/train.py get_data and
    # inference.py): ``[CLS] prefix target [SEP]`` with the loss on target and [SEP] only, where the prefix is
    # empty for captioning and the bare question for VQA (no template, no separator before the answer); at
    # inference the input is ``[CLS] prefix`` and the model continues it.
    prompts = {"captioning": "", "vqa": "{question}", "real_vs_generated": "{question}"}

    def tiny(self, texts: list[str], *, seed: int = 0, image_size: int = 64) -> LoadedModel:
        # The prompt templates add no words of their own, so the dataset's texts are the whole vocabulary.
        tokenizer = train_word_tokenizer(texts)
        vision = GitVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=self.tiny_patch_size,
        )
        config = GitConfig(
            vision_config=vision.to_dict(),
            vocab_size=len(tokenizer),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=2,
            # Text positions only: generate() numbers the text from 0 and the image tokens have none.
            max_position_embeddings=128,
            # GIT's [CLS] starts every sequence and [SEP] ends it; the word tokenizer's <s> and </s> play
            # those roles (it has cls_token = bos_token = <s>, sep_token = eos_token = </s>).
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            # Measured on the shapes study (512 images, batch 16, AdamW 1e-3, 600 steps): at the usual 0.02 the
            # image path does not learn and finetuning settles on the caption prior (one caption for every test
            # image, VQA 0.42, the per-question prior); 0.1 lets it learn (14-17 distinct captions, VQA
            # 0.58-0.64; 0.2 and 0.3 are worse again). It covers the text decoder, the visual projection and
            # the LM head; the vision encoder keeps its own config's 0.02.
            initializer_range=0.1,
            # No dropout in the tiny model: it learns faster (VQA 0.64 instead of 0.58 in the same study).
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        torch.manual_seed(seed)
        model = GitForCausalLM(config)
        processor = GitProcessor(
            image_processor=CLIPImageProcessorPil(
                size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
            ),
            tokenizer=tokenizer,
        )
        return LoadedModel(model.eval(), processor, self.name, self, source="tiny:git")

    def from_pretrained(self, source: str, **kwargs: Any) -> LoadedModel:
        model = GitForCausalLM.from_pretrained(source, **kwargs)
        processor = GitProcessor.from_pretrained(source)
        return LoadedModel(model.eval(), processor, self.name, self, source=source)

    def parts(self, model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
        vision = model.git.image_encoder.vision_model.encoder.layers
        language = model.git.encoder.layer
        return {
            "vision": [(f"git.image_encoder.vision_model.encoder.layers.{i}", m) for i, m in enumerate(vision)],
            # git.visual_projection is a Linear + LayerNorm, not a layer list.
            "bridge": [],
            "language": [(f"git.encoder.layer.{i}", m) for i, m in enumerate(language)],
        }

    def encode(
        self, loaded: LoadedModel, images: list | None, prompts: list[str], targets: list[str] | None = None
    ) -> Encoded:
        tok = loaded.tokenizer
        config = loaded.model.config
        # The image tokens are prepended inside the model (from pixel_values), not as placeholder ids.
        prompt_ids = [[config.bos_token_id, *text_ids(tok, p)] for p in prompts]
        if targets is None:
            sequences, labels = prompt_ids, None
        else:
            eos = config.eos_token_id
            sequences = [p + text_ids(tok, t) + [eos] for p, t in zip(prompt_ids, targets, strict=True)]
            labels = [[-100] * len(p) + s[len(p) :] for p, s in zip(prompt_ids, sequences, strict=True)]
        inputs = pad_right(sequences, labels, pad_id=tok.pad_token_id)
        if images is not None:
            inputs["pixel_values"] = pixel_values(loaded.processor, images, loaded.model.dtype)
        return Encoded(inputs, prompt_length=len(prompt_ids[0]))

    def generate(self, loaded: LoadedModel, encoded: Encoded, **generate_kwargs: Any) -> list[str]:
        config = loaded.model.config
        generate_kwargs.setdefault("eos_token_id", config.eos_token_id)
        generate_kwargs.setdefault("pad_token_id", config.pad_token_id)
        out = loaded.model.generate(**encoded.inputs, **generate_kwargs)
        return loaded.tokenizer.batch_decode(out[:, encoded.prompt_length :], skip_special_tokens=True)
