"""BLIP for image-text retrieval (Li et al. 2022, https://arxiv.org/abs/2201.12086): contrastive and matching heads.

The retrieval checkpoints (``Salesforce/blip-itm-base-coco``, ``-flickr``, ``-large-*``) pair a ViT
with a BERT text encoder. Image-text contrastive (ITC) similarity is the cosine of the projected
CLS states of the ViT (``vision_proj``) and of the text encoder run alone (``text_proj``);
image-text matching (ITM) runs the text encoder with cross-attention to every image token and
classifies its CLS state (``itm_head``: no match / match). Retrieval ranks everything by ITC and
re-ranks the top k by ITM logit + ITC, as the paper's evaluation does.

Parts: the ViT layers (``vision``) and the text encoder's layers (``language``, each with self-
attention, cross-attention and an MLP); no bridge. The projections and the ITM head sit outside
every listed layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessorPil, BlipProcessor

from vlmopt.models.base import Encoded, FamilyAdapter, LoadedModel
from vlmopt.models.blip import BlipAdapter
from vlmopt.models.clip import contrastive_loss, normalised
from vlmopt.models.encoding import pixel_values, text_batch
from vlmopt.models.tokenizer import train_word_tokenizer

__all__ = ["BlipItmAdapter"]


class BlipItmAdapter(FamilyAdapter):
    name = "blip-itm"
    model_class = BlipForImageTextRetrieval
    tasks = ("retrieval", "classification")
    matches = True
    # Texts are encoded as given (captions; class names already set in the dataset's templates).
    prompts = {"retrieval": "{question}", "classification": "{question}"}

    def tiny(self, texts: list[str], *, seed: int = 0, image_size: int = 64) -> LoadedModel:
        tokenizer = train_word_tokenizer([*texts, "a photo of a"])
        vision, text = BlipAdapter.tiny_configs(tokenizer, image_size)
        torch.manual_seed(seed)
        config = BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_text_hidden_size=32)
        model = BlipForImageTextRetrieval(config)
        processor = BlipProcessor(
            image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
            tokenizer=tokenizer,
        )
        return LoadedModel(model.eval(), processor, self.name, self, source="tiny:blip-itm")

    def from_pretrained(self, source: str, **kwargs: Any) -> LoadedModel:
        model = BlipForImageTextRetrieval.from_pretrained(source, **kwargs)
        processor = BlipProcessor.from_pretrained(source)
        return LoadedModel(model.eval(), processor, self.name, self, source=source)

    def parts(self, model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
        return {
            "vision": [
                (f"vision_model.encoder.layers.{i}", m) for i, m in enumerate(model.vision_model.encoder.layers)
            ],
            "bridge": [],
            "language": [
                (f"text_encoder.encoder.layer.{i}", m) for i, m in enumerate(model.text_encoder.encoder.layer)
            ],
        }

    def _text_inputs(self, loaded: LoadedModel, texts: list[str]) -> dict[str, torch.Tensor]:
        inputs = text_batch(loaded.tokenizer, texts, max_length=loaded.model.config.text_config.max_position_embeddings)
        return {k: v.to(loaded.model.device) for k, v in inputs.items()}

    def encode(
        self, loaded: LoadedModel, images: list | None, prompts: list[str], targets: list[str] | None = None
    ) -> Encoded:
        """Texts (``targets`` when given, else ``prompts``) and images for one ITM forward."""
        inputs = self._text_inputs(loaded, list(targets if targets is not None else prompts))
        if images is not None:
            inputs["pixel_values"] = pixel_values(loaded.processor, images, loaded.model.dtype)
        return Encoded(inputs, prompt_length=0)

    def generate(self, loaded: LoadedModel, encoded: Encoded, **generate_kwargs: Any) -> list[str]:
        raise NotImplementedError("BLIP retrieval models do not generate text; they run retrieval and classification")

    #: Contrastive and matching training pair an image with one of its captions.
    train_tasks = ("retrieval",)
    #: Temperature of the contrastive loss: BLIP's initial value (its checkpoints' learned ``temp`` is
    #: not part of the transformers model).
    temperature = 0.07

    def loss(self, loaded: LoadedModel, encoded: Encoded) -> torch.Tensor:
        """BLIP's ITC + ITM losses on a batch of matching pairs.

        ITC: :func:`~vlmopt.models.clip.contrastive_loss` at :attr:`temperature`. ITM: each pair is a
        positive, and each image's most similar (by ITC) non-identical text in the batch its hard
        negative, as in BLIP's hard-negative mining (there sampled in proportion to similarity; here
        the argmax, so training is deterministic). A batch whose texts are all identical has no
        negative and trains ITC only.
        """
        model, inputs = loaded.model, encoded.inputs
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        image_states = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        text_states = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        image_feat = normalised(model.vision_proj(image_states[:, 0, :]))
        text_feat = normalised(model.text_proj(text_states[:, 0, :]))
        sims = image_feat @ text_feat.T
        loss = contrastive_loss(sims / self.temperature, ids)
        same = (ids[:, None, :] == ids[None, :, :]).all(-1)
        negative = sims.detach().masked_fill(same, float("-inf")).argmax(1)
        has_negative = ~same.all(1)
        rows = torch.arange(len(ids), device=ids.device)
        pairs = torch.cat([rows, rows[has_negative]])
        texts = torch.cat([rows, negative[has_negative]])
        labels = torch.cat([torch.ones_like(rows), torch.zeros_like(rows[has_negative])])
        image_mask = torch.ones(image_states.shape[:-1], dtype=torch.long, device=ids.device)
        fused = model.text_encoder(
            input_ids=ids[texts],
            attention_mask=mask[texts],
            encoder_hidden_states=image_states[pairs],
            encoder_attention_mask=image_mask[pairs],
        ).last_hidden_state
        itm = model.itm_head(fused[:, 0, :])
        return loss + torch.nn.functional.cross_entropy(itm.float(), labels)

    def _image_states(self, loaded: LoadedModel, images: list) -> torch.Tensor:
        pixels = pixel_values(loaded.processor, images, loaded.model.dtype).to(loaded.model.device)
        return loaded.model.vision_model(pixel_values=pixels).last_hidden_state

    def embed_images(self, loaded: LoadedModel, images: list) -> torch.Tensor:
        return normalised(loaded.model.vision_proj(self._image_states(loaded, images)[:, 0, :]))

    def embed_texts(self, loaded: LoadedModel, texts: list[str]) -> torch.Tensor:
        states = loaded.model.text_encoder(**self._text_inputs(loaded, texts)).last_hidden_state
        return normalised(loaded.model.text_proj(states[:, 0, :]))

    def match(self, loaded: LoadedModel, images: list, texts: list[str]) -> torch.Tensor:
        image_states = self._image_states(loaded, images)
        image_mask = torch.ones(image_states.shape[:-1], dtype=torch.long, device=image_states.device)
        states = loaded.model.text_encoder(
            **self._text_inputs(loaded, texts), encoder_hidden_states=image_states, encoder_attention_mask=image_mask
        ).last_hidden_state
        return loaded.model.itm_head(states[:, 0, :])[:, 1].float()
