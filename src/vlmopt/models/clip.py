"""CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020): a ViT and a text transformer trained contrastively.

Both towers end in a Linear projection (``visual_projection``, ``text_projection``) into one space
where the cosine similarity of an image and a text ranks captions (retrieval) and class prompts
(zero-shot classification). The image is summarised by its CLS token after the last layer norm;
the text by the hidden state at its end-of-text token (causal attention, so padding after that
token changes nothing).

There is no bridge: the projections sit outside every listed layer and are reached only by naming
them in ``modules``. The text encoder is the ``language`` part.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import processors
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

from vlmopt.models.base import Encoded, FamilyAdapter, LoadedModel
from vlmopt.models.encoding import pixel_values, text_batch
from vlmopt.models.tokenizer import train_word_tokenizer

__all__ = ["ClipAdapter", "contrastive_loss", "normalised"]

#: CLIP's end-of-text token; the tiny tokenizer gives it the highest id, as CLIP's own BPE does.
END_OF_TEXT = "<|endoftext|>"


def normalised(features: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, in float32 (cosine similarity is then a dot product)."""
    return torch.nn.functional.normalize(features.float(), dim=-1)


def contrastive_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric image-text InfoNCE over a batch of pairs, ``logits`` (images x texts) already scaled.

    Row i's positives are every text identical to text i (same token ids), not only text i: a batch
    may hold one caption for several images (COCO-style datasets repeat short captions), and
    treating those as negatives would push apart pairs that match. With unique texts this is the
    CLIP loss (cross-entropy against the diagonal, both directions, averaged).
    """
    same = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1).to(logits.dtype)
    target = same / same.sum(1, keepdim=True)
    return (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2


def _tiny_tokenizer(texts: list[str]) -> Any:
    """Word-level tokenizer whose sequences are ``<s> words <|endoftext|>``.

    transformers pools CLIP text at ``argmax(input_ids)`` when ``eos_token_id`` is 2 (checkpoints
    from before its PR #24773) and at the first ``eos_token_id`` otherwise; an end-of-text token
    with the highest id is right under both rules, as in the released checkpoints.
    """
    tokenizer = train_word_tokenizer(texts)
    tokenizer.add_special_tokens({"eos_token": END_OF_TEXT})
    eot = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    assert eot == len(tokenizer) - 1
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"<s> $A {END_OF_TEXT}", special_tokens=[("<s>", tokenizer.bos_token_id), (END_OF_TEXT, eot)]
    )
    return tokenizer


class ClipAdapter(FamilyAdapter):
    name = "clip"
    model_class = CLIPModel
    tasks = ("retrieval", "classification")
    matches = False
    #: Patch side of the tiny model's vision encoder, in pixels.
    tiny_patch_size = 8
    # Texts are encoded as given: captions for retrieval, and for classification the class names
    # already set in the dataset's templates ("a photo of a {}.", CLIP's default).
    prompts = {"retrieval": "{question}", "classification": "{question}"}

    def tiny(self, texts: list[str], *, seed: int = 0, image_size: int = 64) -> LoadedModel:
        tokenizer = _tiny_tokenizer([*texts, "a photo of a"])
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=self.tiny_patch_size,
        )
        text = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=64,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), projection_dim=32))
        processor = CLIPProcessor(
            image_processor=CLIPImageProcessorPil(
                size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
            ),
            tokenizer=tokenizer,
        )
        return LoadedModel(model.eval(), processor, self.name, self, source="tiny:clip")

    def from_pretrained(self, source: str, **kwargs: Any) -> LoadedModel:
        model = CLIPModel.from_pretrained(source, **kwargs)
        processor = CLIPProcessor.from_pretrained(source)
        return LoadedModel(model.eval(), processor, self.name, self, source=source)

    def parts(self, model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
        return {
            "vision": [
                (f"vision_model.encoder.layers.{i}", m) for i, m in enumerate(model.vision_model.encoder.layers)
            ],
            "bridge": [],
            "language": [(f"text_model.encoder.layers.{i}", m) for i, m in enumerate(model.text_model.encoder.layers)],
        }

    def _text_inputs(self, loaded: LoadedModel, texts: list[str]) -> dict[str, torch.Tensor]:
        return text_batch(loaded.tokenizer, texts, max_length=loaded.model.config.text_config.max_position_embeddings)

    def encode(
        self, loaded: LoadedModel, images: list | None, prompts: list[str], targets: list[str] | None = None
    ) -> Encoded:
        """Texts (``targets`` when given, else ``prompts``) and images for one forward of both towers."""
        inputs = self._text_inputs(loaded, list(targets if targets is not None else prompts))
        if images is not None:
            inputs["pixel_values"] = pixel_values(loaded.processor, images, loaded.model.dtype)
        return Encoded(inputs, prompt_length=0)

    def generate(self, loaded: LoadedModel, encoded: Encoded, **generate_kwargs: Any) -> list[str]:
        raise NotImplementedError("CLIP does not generate text; it runs retrieval and classification")

    #: Contrastive training pairs an image with one of its captions.
    train_tasks = ("retrieval",)

    def loss(self, loaded: LoadedModel, encoded: Encoded) -> torch.Tensor:
        """CLIP's contrastive loss with its learned temperature, identical captions counted as positives."""
        out = loaded.model(**encoded.inputs)
        return contrastive_loss(out.logits_per_image, encoded.inputs["input_ids"])

    def embed_images(self, loaded: LoadedModel, images: list) -> torch.Tensor:
        pixels = pixel_values(loaded.processor, images, loaded.model.dtype).to(loaded.model.device)
        return normalised(loaded.model.get_image_features(pixel_values=pixels).pooler_output)

    def embed_texts(self, loaded: LoadedModel, texts: list[str]) -> torch.Tensor:
        inputs = {k: v.to(loaded.model.device) for k, v in self._text_inputs(loaded, texts).items()}
        return normalised(loaded.model.get_text_features(**inputs).pooler_output)
