"""Fuyu (Adept 2023, https://www.adept.ai/blog/fuyu-8b, model card https://huggingface.co/adept/fuyu-8b).

A decoder-only model with no image encoder: the image is cut into ``patch_size`` x ``patch_size``
patches, each patch's pixels go through one Linear (``model.vision_embed_tokens``) straight into
the token embedding space of a Persimmon decoder, and the decoder reads the image patches and the
text as one causal sequence. The image comes first, one placeholder token (``|SPEAKER|``) per
patch in raster order with a ``|NEWLINE|`` token after each row of patches, so images of any
size and aspect ratio need no position embeddings of their own; then ``<s>``, the prompt, and
the beginning-of-answer token ``<0x04>``, after which the model writes its answer.

Parts: there is no vision encoder and no bridge of transformer layers, so ``vision`` and
``bridge`` are empty and ``language`` lists the decoder layers. ``vision_embed_tokens`` sits
outside every layer: a compression step reaches it only by naming it in ``modules``
(``model.vision_embed_tokens``). Persimmon attention has one fused ``query_key_value`` Linear
whose rows are ordered per head (``[q_h; k_h; v_h]`` for each head ``h``) plus an output
``dense``; the MLP is ``dense_h_to_4h`` and ``dense_4h_to_h`` around a squared ReLU.

Inputs (transformers 5): ``pixel_values`` holds the flattened patches (``p * p * 3`` values per
patch, in (row, column, channel) order within the patch) and replaces the ``|SPEAKER|`` embeddings
in order; ``(batch, patches, p * p * 3)`` when every image has the same patch grid, else all
patches of the batch concatenated as ``(patches, p * p * 3)``. The image processor resizes an
image down (never up) to fit its ``size``, pads it to that size and :meth:`FuyuAdapter.image_patches`
crops the padding back to whole patches, as ``FuyuProcessor`` does, so the patch grid follows
each image's own size.

The token sequence is built in :meth:`FuyuAdapter.encode` rather than by calling
``FuyuProcessor``: in transformers 5.23 its call path cannot patchify with the PIL image
processor (the torchvision-free one this project uses) and it drops the first token of the
placeholder string (the SentencePiece ``▁`` of the released tokenizer), which would drop an image
token with the tiny word-level tokenizer. The sequence is the processor's own (image tokens and
newlines, ``<s>``, the prompt, ``<0x04>``) from the loaded checkpoint's tokenizer and image
processor; ``<0x04>`` is appended as its token id where the processor tokenizes it as text after
the prompt (not compared offline with the released tokenizer). :meth:`FuyuAdapter.from_pretrained`
loads the real ``FuyuProcessor``. Prompts without targets are
padded on the left, as the processor does, so a batch of images of different sizes generates as
each image alone; sequences with targets are padded on the right for training.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import FuyuConfig, FuyuForCausalLM, FuyuImageProcessorPil, FuyuProcessor, PersimmonConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlmopt.models.base import Encoded, FamilyAdapter, LoadedModel
from vlmopt.models.encoding import first_eos_id, pad_right, rgb_arrays, text_ids
from vlmopt.models.tokenizer import train_word_tokenizer

__all__ = ["BEGIN_ANSWER_TOKEN", "IMAGE_TOKEN", "NEWLINE_TOKEN", "FuyuAdapter"]

#: Placeholder for one image patch, end of a row of patches, and the token after which the answer begins
#: (the strings FuyuProcessor uses).
IMAGE_TOKEN = "|SPEAKER|"
NEWLINE_TOKEN = "|NEWLINE|"
BEGIN_ANSWER_TOKEN = "<0x04>"
#: The processor puts this literal token between the image and the prompt.
BOS_TOKEN = "<s>"


class FuyuAdapter(FamilyAdapter):
    name = "fuyu"
    model_class = FuyuForCausalLM
    tasks = ("captioning", "vqa", "real_vs_generated")
    encodes_image_with_text = True
    #: Patch side of the tiny model, in pixels (fuyu-8b: 30).
    tiny_patch_size = 8
    # Both from the adept/fuyu-8b model card (https://huggingface.co/adept/fuyu-8b): its captioning example
    # prompt is "Generate a coco-style caption.\n", and its question-answering examples pass the bare question
    # followed by a newline ("What color is the bus?\n").
    prompts = {
        "captioning": "Generate a coco-style caption.\n",
        "vqa": "{question}\n",
        "real_vs_generated": "{question}\n",
    }

    def tiny(self, texts: list[str], *, seed: int = 0, image_size: int = 64) -> LoadedModel:
        tokenizer = train_word_tokenizer([*texts, *(p.format(question="") for p in self.prompts.values())])
        # Special, so that decoding with skip_special_tokens drops them.
        tokenizer.add_tokens([IMAGE_TOKEN, NEWLINE_TOKEN, BEGIN_ANSWER_TOKEN], special_tokens=True)
        patch = self.tiny_patch_size
        text = PersimmonConfig(
            vocab_size=len(tokenizer),
            hidden_size=48,
            # Persimmon's MLP is 4x wide (dense_h_to_4h), as in fuyu-8b (4096 -> 16384).
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=2,
            # Image tokens plus text: (64 / 8) rows of 8 patches and a newline = 72, plus the prompt and answer.
            max_position_embeddings=256,
            # fuyu-8b's settings, spelled out: squared ReLU, query/key LayerNorm, rotary on half of each head.
            hidden_act="relu2",
            qk_layernorm=True,
            rope_parameters={"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5},
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            initializer_range=0.1,
        )
        config = FuyuConfig(
            text_config=text.to_dict(),
            image_size=image_size,
            patch_size=patch,
            num_channels=3,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            # Measured on the shapes captions (40 AdamW steps, lr 3e-3, 16 captions): with the usual 0.02 (here and
            # in the decoder) the loss of each caption with its own image is 0.73 against 0.78 with another image,
            # the caption prior; with 0.1 for the patch projection and the decoder it is 0.34 against 0.94.
            initializer_range=0.1,
        )
        torch.manual_seed(seed)
        model = FuyuForCausalLM(config)
        processor = FuyuProcessor(
            image_processor=FuyuImageProcessorPil(
                size={"height": image_size, "width": image_size}, patch_size={"height": patch, "width": patch}
            ),
            tokenizer=tokenizer,
        )
        return LoadedModel(model.eval(), processor, self.name, self, source="tiny:fuyu")

    def from_pretrained(self, source: str, **kwargs: Any) -> LoadedModel:
        model = FuyuForCausalLM.from_pretrained(source, **kwargs)
        processor = FuyuProcessor.from_pretrained(source)
        return LoadedModel(model.eval(), processor, self.name, self, source=source)

    def parts(self, model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
        language = model.model.language_model.layers
        return {
            # No image encoder: model.vision_embed_tokens is one Linear outside every layer.
            "vision": [],
            "bridge": [],
            "language": [(f"model.language_model.layers.{i}", m) for i, m in enumerate(language)],
        }

    def image_patches(self, loaded: LoadedModel, images: list) -> list[torch.Tensor]:
        """Per image, its patches as a ``(rows, columns, p * p * channels)`` tensor of the model's dtype.

        Resizing (down only), padding and normalisation are the checkpoint's image processor's; the
        padding is then cropped to the image's own size rounded up to whole patches, and each patch is
        flattened in (row, column, channel) order, as ``FuyuProcessor`` does.
        """
        image_processor = loaded.processor.image_processor
        patch_h, patch_w = _side(image_processor.patch_size, "height"), _side(image_processor.patch_size, "width")
        arrays = rgb_arrays(images)
        out = image_processor(images=arrays)
        patches = []
        for i in range(len(arrays)):
            image = torch.as_tensor(np.asarray(out["images"][i][0]))
            channels, height, width = image.shape
            rows = min(height, math.ceil(_first(out["image_unpadded_heights"][i]) / patch_h) * patch_h) // patch_h
            cols = min(width, math.ceil(_first(out["image_unpadded_widths"][i]) / patch_w) * patch_w) // patch_w
            image = image[:, : rows * patch_h, : cols * patch_w]
            grid = image.reshape(channels, rows, patch_h, cols, patch_w).permute(1, 3, 2, 4, 0)
            patches.append(grid.reshape(rows, cols, patch_h * patch_w * channels).to(loaded.model.dtype))
        return patches

    def image_inputs(self, loaded: LoadedModel, images: list) -> dict[str, torch.Tensor]:
        """``pixel_values`` of ``images``: the patches that replace the image tokens :meth:`encode` writes.

        The token sequence depends on each image's patch grid, so these only fit ``input_ids`` that
        :meth:`encode` built from the same images.
        """
        return {"pixel_values": _stack_patches(self.image_patches(loaded, images))}

    def encode(
        self, loaded: LoadedModel, images: list | None, prompts: list[str], targets: list[str] | None = None
    ) -> Encoded:
        tok = loaded.tokenizer
        image_id, newline_id = _token_id(tok, IMAGE_TOKEN), _token_id(tok, NEWLINE_TOKEN)
        if image_id != loaded.model.config.image_token_id:
            raise ValueError(
                f"the tokenizer's {IMAGE_TOKEN} is id {image_id}, the model's image_token_id is "
                f"{loaded.model.config.image_token_id}"
            )
        bos, begin_answer = _token_id(tok, BOS_TOKEN), _token_id(tok, BEGIN_ANSWER_TOKEN)
        patches = self.image_patches(loaded, images) if images is not None else None
        if patches is not None and len(patches) != len(prompts):
            raise ValueError(f"{len(patches)} images for {len(prompts)} prompts")
        prompt_ids = []
        for i, prompt in enumerate(prompts):
            # Without images the prompt stands alone (text-only input), as FuyuProcessor does with text only.
            image_ids = [] if patches is None else _image_token_ids(patches[i], image_id, newline_id)
            prompt_ids.append([*image_ids, bos, *text_ids(tok, prompt), begin_answer])
        pad = self._pad_id(loaded)
        if targets is None:
            inputs = _pad_left(prompt_ids, pad_id=pad)
            prompt_length = inputs["input_ids"].shape[1]
        else:
            eos = first_eos_id(loaded)
            sequences = [p + text_ids(tok, t) + [eos] for p, t in zip(prompt_ids, targets, strict=True)]
            # Image tokens, newlines, <s>, the prompt and <0x04> are never learned; padding neither.
            labels = [[-100] * len(p) + s[len(p) :] for p, s in zip(prompt_ids, sequences, strict=True)]
            inputs = pad_right(sequences, labels, pad_id=pad)
            prompt_length = len(prompt_ids[0])
        if patches is not None:
            inputs["pixel_values"] = _stack_patches(patches)
        return Encoded(inputs, prompt_length=prompt_length)

    def generate(self, loaded: LoadedModel, encoded: Encoded, **generate_kwargs: Any) -> list[str]:
        model = loaded.model
        generate_kwargs.setdefault("eos_token_id", first_eos_id(loaded))
        generate_kwargs.setdefault("pad_token_id", self._pad_id(loaded))
        inputs = dict(encoded.inputs)
        copies = int(generate_kwargs.get("num_beams") or 1) * int(generate_kwargs.get("num_return_sequences") or 1)
        if copies > 1 and "pixel_values" in inputs:
            # generate() repeats each row's image tokens per beam but, for Fuyu (whose image features carry no
            # pooler_output), not the patch embeddings; hand it the embeddings already repeated per row.
            inputs["mm_encoder_outputs"] = {"image": _repeated_features(model, inputs, copies)}
            del inputs["pixel_values"]
        out = model.generate(**inputs, **generate_kwargs)
        return loaded.tokenizer.batch_decode(out[:, encoded.prompt_length :], skip_special_tokens=True)

    @staticmethod
    def _pad_id(loaded: LoadedModel) -> int:
        # FuyuProcessor sets the tokenizer's pad id (0) when it is built.
        for pad in (loaded.model.config.text_config.pad_token_id, loaded.tokenizer.pad_token_id):
            if pad is not None:
                return pad
        return first_eos_id(loaded)


def _side(size: Any, key: str) -> int:
    return int(size[key] if isinstance(size, dict) else getattr(size, key))


def _first(value: Any) -> int:
    """The number in a processor output entry such as ``[64]`` or ``tensor([64])``."""
    return int(np.asarray(value).reshape(-1)[0])


def _token_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token!r} token, which Fuyu's input format needs")
    return token_id


def _image_token_ids(patches: torch.Tensor, image_id: int, newline_id: int) -> list[int]:
    """One image token per patch, row by row, each row ended by a newline token."""
    rows, cols = patches.shape[:2]
    return ([image_id] * cols + [newline_id]) * rows


def _stack_patches(patches: list[torch.Tensor]) -> torch.Tensor:
    """``(batch, patches, dim)`` when every image has the same grid, else ``(all patches, dim)``."""
    flat = [p.reshape(-1, p.shape[-1]) for p in patches]
    if len({p.shape for p in patches}) == 1:
        return torch.stack(flat)
    return torch.cat(flat)


def _pad_left(sequences: list[list[int]], *, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def _repeated_features(model: nn.Module, inputs: dict[str, torch.Tensor], copies: int) -> BaseModelOutputWithPooling:
    """Patch embeddings of ``inputs`` with each row's patches repeated ``copies`` times, in row order."""
    pixel_values = inputs["pixel_values"]
    embeddings = model.model.get_image_features(pixel_values, return_dict=True).last_hidden_state
    if embeddings.ndim == 3:
        repeated = embeddings.repeat_interleave(copies, dim=0)
    else:
        counts = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
        repeated = torch.cat([chunk for chunk in embeddings.split(counts) for _ in range(copies)])
    return BaseModelOutputWithPooling(last_hidden_state=repeated)
