"""Pix2Struct (Lee et al. 2023, https://arxiv.org/abs/2210.03347) and MatCha (Liu et al. 2023).

An image-to-text encoder-decoder: a ViT over variable-resolution flattened patches (the image is
resized, keeping its aspect ratio, to as many ``patch_size`` patches as ``max_patches`` allows;
each patch carries its 1-based row and column as its first two values) and a T5-style text
decoder whose layers have self-attention, cross-attention to the patches and a gated MLP. There
is no bridge. MatCha (https://arxiv.org/abs/2212.09662) and DePlot checkpoints (``google/matcha-base``,
``google/deplot``) are the same architecture.

VQA: Pix2Struct's VQA checkpoints render the question as a header above the image and decode the
answer from an empty prompt (``Pix2StructProcessor`` with ``is_vqa``). :meth:`encode` does the same
whenever the checkpoint's image processor has ``is_vqa`` set; the header font is the processor's
default (Arial, downloaded from the hub repository ``ybelkada/fonts``). The tiny model cannot read
text drawn onto a 64x64 image and must build offline, so its image processor has ``is_vqa`` off
and the question is fed as the decoder prompt instead, with the answer decoded after it (the same
fallback a captioning checkpoint such as ``google/pix2struct-textcaps-base`` gets for VQA).

Inputs differ from the ViT families: images become ``flattened_patches`` plus an ``attention_mask``
over the patches, and the text goes in as ``decoder_input_ids`` / ``decoder_attention_mask`` that
start with ``decoder_start_token_id`` (the pad token, as in T5). :meth:`Pix2StructAdapter.image_inputs`
is the image half of :meth:`~Pix2StructAdapter.encode`, for callers that preprocess images apart
from text.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    Pix2StructConfig,
    Pix2StructForConditionalGeneration,
    Pix2StructImageProcessorPil,
    Pix2StructProcessor,
    Pix2StructTextConfig,
    Pix2StructVisionConfig,
)

from vlmopt.models.base import Encoded, FamilyAdapter, LoadedModel
from vlmopt.models.encoding import pad_right, rgb_arrays, text_ids
from vlmopt.models.tokenizer import train_word_tokenizer

__all__ = ["Pix2StructAdapter"]


class Pix2StructAdapter(FamilyAdapter):
    name = "pix2struct"
    model_class = Pix2StructForConditionalGeneration
    tasks = ("captioning", "vqa", "real_vs_generated")
    encodes_image_with_text = True
    #: Patch side of the tiny model's vision encoder, in pixels.
    tiny_patch_size = 8
    # Captioning decodes from an empty prompt (google/pix2struct-textcaps-base); VQA checkpoints
    # take the bare question as the header text (paper abstract: "language prompts such as
    # questions are rendered directly on top of the input image"; Pix2StructProcessor passes its
    # text as header_text when is_vqa).
    prompts = {"captioning": "", "vqa": "{question}", "real_vs_generated": "{question}"}

    def tiny(self, texts: list[str], *, seed: int = 0, image_size: int = 64) -> LoadedModel:
        tokenizer = train_word_tokenizer([*texts, *(p.format(question="") for p in self.prompts.values())])
        patch = self.tiny_patch_size
        # Exactly the (image_size / patch)^2 patches of a square image; other aspect ratios get
        # the same budget, rearranged (up to max_patches rows or columns).
        max_patches = (image_size // patch) ** 2
        vision = Pix2StructVisionConfig(
            hidden_size=48,
            patch_embed_hidden_size=patch * patch * 3,
            d_ff=96,
            d_kv=24,
            num_hidden_layers=3,
            num_attention_heads=2,
            # Rows and columns are 1-based indices into the position embeddings; the default
            # (4096) would spend most of the parameters on embeddings never used.
            seq_len=max_patches + 1,
        )
        text = Pix2StructTextConfig(
            vocab_size=len(tokenizer),
            # The decoder's q/k/v/o are hidden_size x hidden_size and cross-attention reads the
            # encoder's states directly, so hidden_size = num_heads * d_kv = the vision width.
            hidden_size=48,
            d_kv=24,
            d_ff=96,
            num_layers=3,
            num_heads=2,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            # As in T5 and the released checkpoints, decoding starts from the pad token.
            decoder_start_token_id=tokenizer.pad_token_id,
            # The text config's default (False) makes every generation step recompute the prefix.
            use_cache=True,
        )
        # The top-level initializer_range (0.02) replaces the vision config's default (1e-10),
        # which would leave a random ViT inert.
        config = Pix2StructConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), initializer_range=0.02)
        torch.manual_seed(seed)
        model = Pix2StructForConditionalGeneration(config)
        processor = Pix2StructProcessor(
            image_processor=Pix2StructImageProcessorPil(
                patch_size={"height": patch, "width": patch}, max_patches=max_patches, is_vqa=False
            ),
            tokenizer=tokenizer,
        )
        return LoadedModel(model.eval(), processor, self.name, self, source="tiny:pix2struct")

    def from_pretrained(self, source: str, **kwargs: Any) -> LoadedModel:
        model = Pix2StructForConditionalGeneration.from_pretrained(source, **kwargs)
        processor = Pix2StructProcessor.from_pretrained(source)
        return LoadedModel(model.eval(), processor, self.name, self, source=source)

    def parts(self, model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
        vision = model.encoder.encoder.layer
        language = model.decoder.layer
        return {
            "vision": [(f"encoder.encoder.layer.{i}", m) for i, m in enumerate(vision)],
            "bridge": [],
            "language": [(f"decoder.layer.{i}", m) for i, m in enumerate(language)],
        }

    @staticmethod
    def renders_header(loaded: LoadedModel) -> bool:
        """True when the checkpoint reads prompts as a header drawn onto the image (VQA checkpoints)."""
        return bool(getattr(loaded.processor.image_processor, "is_vqa", False))

    def image_inputs(
        self, loaded: LoadedModel, images: list, headers: list[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """``flattened_patches`` (model dtype) and the patch ``attention_mask`` of PIL images (or arrays).

        ``headers`` are drawn above the images when the checkpoint renders headers (VQA checkpoints).
        """
        image_processor = loaded.processor.image_processor
        arrays = rgb_arrays(images)
        # Passed explicitly: Pix2StructProcessor's own default (2048) would override the image
        # processor's setting if the call went through the processor.
        kwargs: dict[str, Any] = {"max_patches": image_processor.max_patches}
        if self.renders_header(loaded):
            kwargs["header_text"] = list(headers) if headers is not None else [""] * len(arrays)
        out = image_processor(images=arrays, return_tensors="pt", **kwargs)
        return {
            "flattened_patches": out["flattened_patches"].to(loaded.model.dtype),
            "attention_mask": out["attention_mask"],
        }

    def encode(
        self, loaded: LoadedModel, images: list | None, prompts: list[str], targets: list[str] | None = None
    ) -> Encoded:
        tok = loaded.tokenizer
        config = loaded.model.config
        header = self.renders_header(loaded)
        start = config.decoder_start_token_id
        # With a header the prompt is in the image and the decoder starts from its start token alone.
        prompt_ids = [[start] if header else [start, *text_ids(tok, p)] for p in prompts]
        if targets is None:
            sequences, labels = prompt_ids, None
        else:
            eos = _first(config.text_config.eos_token_id)
            full = [p + text_ids(tok, t) + [eos] for p, t in zip(prompt_ids, targets, strict=True)]
            # Decoder input is the sequence without its last id; labels are the next ids, learned
            # only after the prompt (the model computes the loss without shifting).
            sequences = [s[:-1] for s in full]
            labels = [[-100] * (len(p) - 1) + s[len(p) :] for p, s in zip(prompt_ids, full, strict=True)]
        padded = pad_right(sequences, labels, pad_id=tok.pad_token_id)
        inputs = {"decoder_input_ids": padded["input_ids"], "decoder_attention_mask": padded["attention_mask"]}
        if labels is not None:
            inputs["labels"] = padded["labels"]
        if images is not None:
            inputs.update(self.image_inputs(loaded, images, prompts))
        return Encoded(inputs, prompt_length=len(prompt_ids[0]))

    def generate(self, loaded: LoadedModel, encoded: Encoded, **generate_kwargs: Any) -> list[str]:
        text_config = loaded.model.config.text_config
        generate_kwargs.setdefault("eos_token_id", text_config.eos_token_id)
        generate_kwargs.setdefault("pad_token_id", text_config.pad_token_id)
        out = loaded.model.generate(**encoded.inputs, **generate_kwargs)
        return loaded.tokenizer.batch_decode(out[:, encoded.prompt_length :], skip_special_tokens=True)


def _first(token_id: int | list[int]) -> int:
    return token_id[0] if isinstance(token_id, list) else token_id
