"""Qwen2.5-VL (Bai et al. 2025, https://arxiv.org/abs/2502.13923): a native-resolution ViT, a patch merger and Qwen2.5.

The vision tower cuts each image, resized to multiples of ``patch_size * spatial_merge_size``
within a pixel budget, into ``patch_size`` x ``patch_size`` patches (each repeated
``temporal_patch_size`` times, as a still frame of a video), so the number of image tokens
depends on the image's size. Its blocks attend within windows of ``window_size`` pixels, except
the blocks in ``fullatt_block_indexes``, which attend over the whole image; 2-D rotary positions
replace position embeddings. The patch merger (an RMSNorm and two Linears with a GELU, in
``model.visual.merger``) joins every ``spatial_merge_size`` x ``spatial_merge_size`` patches into
one token of the language model's width. Those tokens replace the ``<|image_pad|>`` placeholders of
the prompt, one per merged patch, and the Qwen2.5 decoder (grouped-query attention, SwiGLU MLP)
reads them with multimodal rotary positions (M-RoPE: temporal, height and width indices for image
tokens, equal indices for text).

There is no bridge of transformer layers: the merger is an MLP outside every listed layer, so a
compression step reaches its Linears only by naming them in ``modules``
(``model.visual.merger.mlp.0``, ``model.visual.merger.mlp.2``).

Inputs: ``pixel_values`` holds the patches of all images of a batch, concatenated
(``(n_patches, channels * temporal_patch_size * patch_size**2)``), with ``image_grid_thw`` (one
``(t, h, w)`` patch grid per image); ``mm_token_type_ids`` marks the image tokens (1) in
``input_ids``. Without it the model silently falls back to 1-D text positions for the image
tokens, so :meth:`Qwen25VLAdapter.encode` always adds it. :meth:`Qwen25VLAdapter.image_inputs` is
the image half of :meth:`~Qwen25VLAdapter.encode`.

Padding: images of different sizes give prompts of different lengths even for one prompt text, so
a generation batch can hold prompts of different lengths. :meth:`~Qwen25VLAdapter.encode` pads
prompts on the left when there are no targets (every row's answer then starts at the same
column, and the attention mask and M-RoPE positions skip the padding); training batches are padded
on the right, with the padding and the prompt masked out of the labels.

Processor: ``Qwen2_5_VLProcessor`` cannot be built without torchvision (its video processor needs
it), which this project does not install. :class:`QwenVLProcessor` pairs the tokenizer with
``Qwen2VLImageProcessorPil`` instead and saves both into the model folder (the tokenizer files and
``preprocessor_config.json``, the files a hub checkpoint has); :meth:`Qwen25VLAdapter.from_pretrained`
reads the same two files back, from a hub checkpoint or a saved folder. The image placeholder is
expanded here (``<|vision_start|>`` + N x ``<|image_pad|>`` + ``<|vision_end|>``, N =
``t * h * w / merge_size**2``), as the hub processor does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
    Qwen2VLImageProcessorPil,
)

from vlmopt.models.base import Encoded, FamilyAdapter, LoadedModel
from vlmopt.models.encoding import pad_right, rgb_arrays, text_ids
from vlmopt.models.tokenizer import train_word_tokenizer

__all__ = ["CHAT_TOKENS", "Qwen25VLAdapter", "QwenVLProcessor"]

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
#: The chat-format and vision tokens of the Qwen2.5-VL tokenizer that the prompts use.
CHAT_TOKENS = (IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# The Qwen2.5-VL chat format of the instruct checkpoints (chat_template of Qwen/Qwen2.5-VL-7B-Instruct:
# the default system message, then a user turn holding the image and the text, then the assistant turn,
# whose answer ends with <|im_end|>).
_CHAT = (
    f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n"
    f"{IM_START}user\n{VISION_START}{IMAGE_PAD}{VISION_END}{{instruction}}{IM_END}\n"
    f"{IM_START}assistant\n"
)


class QwenVLProcessor:
    """A tokenizer and a ``Qwen2VLImageProcessorPil``, saved to and read from one folder.

    Stands in for ``Qwen2_5_VLProcessor``, which needs torchvision; the folder holds what a hub
    checkpoint holds for images and text (tokenizer files, ``preprocessor_config.json``).
    """

    def __init__(self, image_processor: Qwen2VLImageProcessorPil, tokenizer: Any) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    def save_pretrained(self, path: str | Path) -> None:
        self.image_processor.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, source: str | Path) -> QwenVLProcessor:
        return cls(Qwen2VLImageProcessorPil.from_pretrained(source), AutoTokenizer.from_pretrained(source))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_processor={self.image_processor!r}, tokenizer={self.tokenizer!r})"


class Qwen25VLAdapter(FamilyAdapter):
    name = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    tasks = ("captioning", "vqa", "real_vs_generated")
    encodes_image_with_text = True
    #: Patch side of the tiny model's vision tower, in pixels.
    tiny_patch_size = 8
    #: Patches merged per side into one language-model token (2, as in the released models).
    tiny_merge_size = 2
    #: Weight init scale of the tiny model (every sub-config). Measured on one fixed batch of 16 shapes
    #: captions (AdamW 3e-3): at the usual 0.02 the image features hardly differ between images and the
    #: model learns the caption prior for 120+ steps before its loss depends on the image; at 0.1 the loss
    #: with the right images is 0.35 against 0.72 with shuffled ones after 60 steps (0.3 memorizes the batch).
    tiny_initializer_range = 0.1
    # Both prompts use the chat format above. Captioning: "Describe this image.", the instruction of the
    # Qwen2.5-VL model cards' usage example (Qwen/Qwen2.5-VL-7B-Instruct, the "Using Transformers to Chat" example).
    # VQA: the short-answer instruction that lmms-eval's VQAv2 task appends to the question (post_prompt
    # "\nAnswer the question using a single word or phrase.", lmms_eval/tasks/vqav2), the format
    # introduced for short answers by LLaVA-1.5 (Liu et al. 2023, https://arxiv.org/abs/2310.03744).
    prompts = {
        "captioning": _CHAT.format(instruction="Describe this image."),
        "vqa": _CHAT.format(instruction="{question}\nAnswer the question using a single word or phrase."),
        "real_vs_generated": _CHAT.format(instruction="{question}"),
    }

    def tiny(self, texts: list[str], *, seed: int = 0, image_size: int = 64) -> LoadedModel:
        # The real-vs-generated prompt repeats the others' words; leaving it out keeps the tiny vocabulary's order.
        prompts = [p for task, p in self.prompts.items() if task != "real_vs_generated"]
        tokenizer = _tiny_tokenizer([*texts, *(p.format(question="") for p in prompts)])
        patch, merge = self.tiny_patch_size, self.tiny_merge_size
        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in CHAT_TOKENS}
        vision = Qwen2_5_VLVisionConfig(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=patch,
            spatial_merge_size=merge,
            temporal_patch_size=2,
            # Windows of 2 x 2 merged tokens (4 x 4 patches; the released models: 112 px = 4 x 4 merged
            # tokens of 28 px); the last block attends over the whole image, as every 8th block does there.
            window_size=2 * merge * patch,
            fullatt_block_indexes=[2],
            out_hidden_size=64,
            initializer_range=self.tiny_initializer_range,
        )
        text = Qwen2_5_VLTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            # Grouped-query attention, two query heads per key/value head.
            num_key_value_heads=2,
            max_position_embeddings=512,
            # M-RoPE: the head's 16 dims rotate in 8 frequency pairs, split between temporal, height and
            # width indices in the released models' proportions (16, 24, 24 of 64).
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=ids[IM_END],
            initializer_range=self.tiny_initializer_range,
        )
        config = Qwen2_5_VLConfig(
            vision_config=vision.to_dict(),
            text_config=text.to_dict(),
            image_token_id=ids[IMAGE_PAD],
            video_token_id=ids[VIDEO_PAD],
            vision_start_token_id=ids[VISION_START],
            vision_end_token_id=ids[VISION_END],
            initializer_range=self.tiny_initializer_range,
        )
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
        model.generation_config.eos_token_id = ids[IM_END]
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=patch,
            temporal_patch_size=2,
            merge_size=merge,
            # From 2 x 2 merged tokens up to image_size x image_size pixels (a square image of that side
            # gives (image_size / 16)**2 tokens, 16 for 64 x 64).
            min_pixels=(2 * patch * merge) ** 2,
            max_pixels=image_size**2,
        )
        processor = QwenVLProcessor(image_processor, tokenizer)
        return LoadedModel(model.eval(), processor, self.name, self, source="tiny:qwen2_5_vl")

    def from_pretrained(self, source: str, **kwargs: Any) -> LoadedModel:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(source, **kwargs)
        processor = QwenVLProcessor.from_pretrained(source)
        return LoadedModel(model.eval(), processor, self.name, self, source=source)

    def parts(self, model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
        vision = model.model.visual.blocks
        language = model.model.language_model.layers
        return {
            "vision": [(f"model.visual.blocks.{i}", m) for i, m in enumerate(vision)],
            # model.visual.merger is an RMSNorm + MLP, not a layer list.
            "bridge": [],
            "language": [(f"model.language_model.layers.{i}", m) for i, m in enumerate(language)],
        }

    def image_inputs(
        self, loaded: LoadedModel, images: list, prompts: list[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """``pixel_values`` (model dtype, patches of all images concatenated) and ``image_grid_thw`` of PIL images.

        ``prompts`` is accepted for the common hook signature; the image inputs do not depend on it.
        """
        arrays = rgb_arrays(images)
        out = loaded.processor.image_processor(images=arrays, return_tensors="pt")
        return {"pixel_values": out["pixel_values"].to(loaded.model.dtype), "image_grid_thw": out["image_grid_thw"]}

    def encode(
        self, loaded: LoadedModel, images: list | None, prompts: list[str], targets: list[str] | None = None
    ) -> Encoded:
        tok = loaded.tokenizer
        config = loaded.model.config
        image_id = config.image_token_id
        texts = [text_ids(tok, p) for p in prompts]
        with_image = [ids.count(image_id) for ids in texts]
        if images is None:
            if any(with_image):
                raise ValueError(
                    "Qwen2.5-VL: the number of image tokens depends on each image's size (image_grid_thw), so a "
                    "prompt with an <|image_pad|> placeholder cannot be encoded without its image"
                )
            image_inputs: dict[str, torch.Tensor] = {}
            prompt_ids = texts
        else:
            if len(images) != len(prompts) or with_image != [1] * len(prompts):
                raise ValueError(
                    f"Qwen2.5-VL: every prompt needs exactly one {IMAGE_PAD} placeholder and one image; got "
                    f"{len(images)} images and placeholder counts {with_image}"
                )
            image_inputs = self.image_inputs(loaded, images, prompts)
            merge = loaded.processor.image_processor.merge_size
            counts = (image_inputs["image_grid_thw"].prod(dim=-1) // merge**2).tolist()
            prompt_ids = []
            for ids, n in zip(texts, counts, strict=True):
                at = ids.index(image_id)
                prompt_ids.append([*ids[:at], *[image_id] * int(n), *ids[at + 1 :]])
        pad = self._pad_id(loaded)
        if targets is None:
            inputs = _pad_left(prompt_ids, pad_id=pad)
            prompt_length = inputs["input_ids"].shape[1]
        else:
            end = self._end_id(loaded)
            sequences = [p + text_ids(tok, t) + [end] for p, t in zip(prompt_ids, targets, strict=True)]
            labels = [[-100] * len(p) + s[len(p) :] for p, s in zip(prompt_ids, sequences, strict=True)]
            inputs = pad_right(sequences, labels, pad_id=pad)
            prompt_length = len(prompt_ids[0])
        ids = inputs["input_ids"]
        # 1 marks image tokens (2 would mark video tokens); it switches on the 3-D M-RoPE positions.
        inputs["mm_token_type_ids"] = (ids == image_id).to(torch.int) * inputs["attention_mask"].to(torch.int)
        inputs.update(image_inputs)
        return Encoded(inputs, prompt_length=prompt_length)

    def generate(self, loaded: LoadedModel, encoded: Encoded, **generate_kwargs: Any) -> list[str]:
        generate_kwargs.setdefault("eos_token_id", self._eos_ids(loaded))
        generate_kwargs.setdefault("pad_token_id", self._pad_id(loaded))
        out = loaded.model.generate(**encoded.inputs, **generate_kwargs)
        return loaded.tokenizer.batch_decode(out[:, encoded.prompt_length :], skip_special_tokens=True)

    @staticmethod
    def _end_id(loaded: LoadedModel) -> int:
        """``<|im_end|>``, which ends the assistant's turn (and so every target)."""
        end = loaded.tokenizer.convert_tokens_to_ids(IM_END)
        if end is None or end == loaded.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IM_END} token, which ends every answer in the Qwen chat format")
        return end

    @classmethod
    def _eos_ids(cls, loaded: LoadedModel) -> int | list[int]:
        eos = loaded.model.generation_config.eos_token_id
        return cls._end_id(loaded) if eos is None else eos

    @classmethod
    def _pad_id(cls, loaded: LoadedModel) -> int:
        # The released tokenizers pad with <|endoftext|>; the text config may leave pad_token_id unset.
        for pad in (loaded.tokenizer.pad_token_id, loaded.model.config.text_config.pad_token_id):
            if pad is not None:
                return pad
        return cls._end_id(loaded)


def _tiny_tokenizer(texts: list[str]) -> Any:
    """The word tokenizer of ``texts`` (chat tokens left out) plus the chat tokens as special tokens.

    ``<|im_end|>`` becomes the end-of-sequence token, as in the released instruct tokenizers.
    """
    plain = list(texts)
    for token in CHAT_TOKENS:
        plain = [t.replace(token, " ") for t in plain]
    tokenizer = train_word_tokenizer(plain)
    tokenizer.add_special_tokens({"eos_token": IM_END, "additional_special_tokens": list(CHAT_TOKENS)})
    return tokenizer


def _pad_left(sequences: list[list[int]], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad id lists into ``input_ids``/``attention_mask``, so that every row ends at the last column."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return {"input_ids": ids, "attention_mask": mask}
