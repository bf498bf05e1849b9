"""BLIP-2 for image-text retrieval (Li et al. 2023, https://arxiv.org/abs/2301.12597): the Q-Former's ITC and ITM heads.

The retrieval checkpoints (``Salesforce/blip2-itm-vit-g``, ``-vit-g-coco``) are BLIP-2's first
stage: a ViT and the Q-Former, with no language model. The Q-Former is a BERT whose layers run
the learned query tokens (with cross-attention to the image) and text tokens (self-attention
only, with a feed-forward of their own) in one sequence.

* Image-text contrastive (ITC): the queries alone read the image; each query output is projected
  (``vision_projection``) and normalised, so an image is ``num_query_tokens`` vectors. The text
  alone runs through the Q-Former and its first ([CLS]) state is projected (``text_projection``)
  and normalised. The similarity of an image and a text is the largest cosine over the queries
  (paper, section 3.2; :meth:`Blip2ItmAdapter.similarity`).
* Image-text matching (ITM): queries and text run together, queries reading the image and text
  seeing the queries; ``itm_head`` classifies every query output (no match / match) and the logits
  are averaged over the queries.

Retrieval ranks everything by ITC and re-ranks the top k by ITM "match" logit + ITC, as the
BLIP-2 evaluation does (LAVIS ``compute_sim_matrix``; the BLIP-2 quantization study re-ranks k = 128).

Parts: the ViT layers (``vision``) and the Q-Former layers (``bridge``); no ``language`` part.
Query tokens, text embeddings, both projections and the ITM head sit outside every listed layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor, BlipImageProcessorPil

from vlmopt.models.base import Encoded, FamilyAdapter, LoadedModel
from vlmopt.models.blip2 import NUM_QUERY_TOKENS_TINY, Blip2OptAdapter
from vlmopt.models.clip import contrastive_loss, normalised
from vlmopt.models.encoding import pixel_values, text_batch
from vlmopt.models.tokenizer import train_word_tokenizer

__all__ = ["Blip2ItmAdapter"]

#: Text length in tokens, special tokens included: the BLIP-2 retrieval evaluation tokenizes every
#: caption with ``max_length=35`` (LAVIS, ``lavis/models/blip2_models/blip2.py``, ``compute_sim_matrix``).
MAX_TEXT_TOKENS = 35
#: Images per block when scoring by the max over queries, which holds a (block, queries, texts) tensor.
_SIMILARITY_BLOCK = 64


class Blip2ItmAdapter(FamilyAdapter):
    name = "blip2-itm"
    model_class = Blip2ForImageTextRetrieval
    tasks = ("retrieval", "classification")
    matches = True
    # Texts are encoded as given (captions; class names already set in the dataset's templates).
    prompts = {"retrieval": "{question}", "classification": "{question}"}

    def tiny(self, texts: list[str], *, seed: int = 0, image_size: int = 64) -> LoadedModel:
        tokenizer = train_word_tokenizer([*texts, "a photo of a"])
        vision, qformer = Blip2OptAdapter().tiny_vision_and_bridge(image_size, len(tokenizer))
        # The retrieval Q-Former also runs text: its layers get the text feed-forward.
        qformer.use_qformer_text_input = True
        qformer.max_position_embeddings = 64
        qformer.pad_token_id = tokenizer.pad_token_id
        # Measured on the shapes study: with the checkpoints' dropout (0.1) the noise swamps the
        # small image-to-image differences of a 32-wide random Q-Former, and ITC + ITM training
        # settles on equal similarities for every pair (loss ln 16 + ln 2 on a batch of 16, from
        # 4.4); without it 30 AdamW steps at lr 1e-3 bring it below 1.
        qformer.hidden_dropout_prob = qformer.attention_probs_dropout_prob = 0.0
        config = Blip2Config(
            vision_config=vision.to_dict(),
            qformer_config=qformer.to_dict(),
            num_query_tokens=NUM_QUERY_TOKENS_TINY,
            image_text_hidden_size=32,
        )
        torch.manual_seed(seed)
        model = Blip2ForImageTextRetrieval(config)
        # Query tokens start at zero after random init: every query would then give the same output.
        with torch.no_grad():
            model.query_tokens.normal_(std=0.02)
        # Like the released retrieval checkpoints, the processor adds no image tokens to the text.
        processor = Blip2Processor(
            image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
            tokenizer=tokenizer,
        )
        return LoadedModel(model.eval(), processor, self.name, self, source="tiny:blip2-itm")

    def from_pretrained(self, source: str, **kwargs: Any) -> LoadedModel:
        model = Blip2ForImageTextRetrieval.from_pretrained(source, **kwargs)
        processor = Blip2Processor.from_pretrained(source)
        return LoadedModel(model.eval(), processor, self.name, self, source=source)

    def parts(self, model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
        return {
            "vision": [
                (f"vision_model.encoder.layers.{i}", m) for i, m in enumerate(model.vision_model.encoder.layers)
            ],
            "bridge": [(f"qformer.encoder.layer.{i}", m) for i, m in enumerate(model.qformer.encoder.layer)],
            "language": [],
        }

    def _text_inputs(self, loaded: LoadedModel, texts: list[str]) -> dict[str, torch.Tensor]:
        longest = min(MAX_TEXT_TOKENS, loaded.model.config.qformer_config.max_position_embeddings)
        inputs = text_batch(loaded.tokenizer, texts, max_length=longest)
        return {k: v.to(loaded.model.device) for k, v in inputs.items()}

    def encode(
        self, loaded: LoadedModel, images: list | None, prompts: list[str], targets: list[str] | None = None
    ) -> Encoded:
        """Texts (``targets`` when given, else ``prompts``) and images for one ITM forward of the model.

        This is the forward that calibration (GPTQ, AWQ) runs. The ITM path runs the Q-Former once
        over queries and text together, so every Q-Former Linear sees data; the model's default ITC
        path runs it twice (queries, then text), and layer-by-layer calibration, which ends each
        forward right after the layer it calibrates, would never reach the text pass. (BLIP's
        retrieval forward, which blip-itm calibrates with, also defaults to its ITM head.) A
        checkpoint whose config sets ``image_token_index`` expects, and drops, ``num_query_tokens``
        image tokens before the text.
        """
        inputs = self._text_inputs(loaded, list(targets if targets is not None else prompts))
        config = loaded.model.config
        if config.image_token_index is not None:
            n, q = inputs["input_ids"].shape[0], config.num_query_tokens
            image_ids = torch.full((n, q), config.image_token_index, dtype=torch.long, device=loaded.model.device)
            inputs["input_ids"] = torch.cat([image_ids, inputs["input_ids"]], dim=1)
            inputs["attention_mask"] = torch.cat([torch.ones_like(image_ids), inputs["attention_mask"]], dim=1)
        if images is not None:
            inputs["pixel_values"] = pixel_values(loaded.processor, images, loaded.model.dtype)
        # A tensor, as every input is (calibration moves each one to the model's device).
        inputs["use_image_text_matching_head"] = torch.tensor(True)
        return Encoded(inputs, prompt_length=0)

    def generate(self, loaded: LoadedModel, encoded: Encoded, **generate_kwargs: Any) -> list[str]:
        raise NotImplementedError("BLIP-2 retrieval models do not generate text; they run retrieval and classification")

    # Training: BLIP-2's first-stage objectives that the retrieval model has heads for.

    #: Contrastive and matching training pair an image with one of its captions.
    train_tasks = ("retrieval",)
    #: Temperature of the contrastive loss: BLIP-2's initial value (LAVIS ``Blip2Qformer.temp``, learned
    #: there; the transformers model has no temperature).
    temperature = 0.07

    def loss(self, loaded: LoadedModel, encoded: Encoded) -> torch.Tensor:
        """BLIP-2's ITC + ITM losses on a batch of matching pairs (paper, section 3.2).

        ITC: :func:`~vlmopt.models.clip.contrastive_loss` of the max-over-queries similarities at
        :attr:`temperature`. ITM: each pair is a positive; each text's most similar (by ITC) other
        image and each image's most similar non-identical text are its hard negatives, as in
        BLIP-2's hard-negative mining (sampled there in proportion to similarity; here the argmax,
        so training is deterministic). Pairs whose text recurs for every image have no negative.
        The third objective, image-grounded text generation, needs a decoder head the retrieval
        model does not have.
        """
        model, inputs = loaded.model, encoded.inputs
        ids, mask = self._text_part(loaded, inputs)
        states, image_mask = self._vision(model, inputs["pixel_values"].to(model.device, model.dtype))
        sims = self.similarity(
            loaded, self._image_features(model, states, image_mask), self._text_features(model, ids, mask)
        )
        loss = contrastive_loss(sims / self.temperature, ids)
        same = (ids[:, None, :] == ids[None, :, :]).all(-1)
        hard = sims.detach().masked_fill(same, float("-inf"))
        rows = torch.arange(len(ids), device=ids.device)
        has_negative = ~same.all(1)
        keep = rows[has_negative]
        # Positives, then (negative image, text) for each text, then (image, negative text) for each image.
        images = torch.cat([rows, hard.argmax(0)[keep], keep])
        texts = torch.cat([rows, keep, hard.argmax(1)[keep]])
        labels = torch.cat([torch.ones_like(rows), torch.zeros_like(keep), torch.zeros_like(keep)])
        itm = self._itm_logits(model, states[images], image_mask[images], ids[texts], mask[texts])
        return loss + torch.nn.functional.cross_entropy(itm.float(), labels)

    def _text_part(self, loaded: LoadedModel, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text ids and mask of encoded inputs, without the image tokens :meth:`encode` may put first."""
        ids, mask = inputs["input_ids"].to(loaded.model.device), inputs["attention_mask"].to(loaded.model.device)
        if loaded.model.config.image_token_index is not None:
            q = loaded.model.config.num_query_tokens
            ids, mask = ids[:, q:], mask[:, q:]
        return ids, mask

    @staticmethod
    def _vision(model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ViT output for each image and its (all-ones) attention mask."""
        states = model.vision_model(pixel_values=pixels).last_hidden_state
        return states, torch.ones(states.shape[:-1], dtype=torch.long, device=states.device)

    @staticmethod
    def _image_features(model: nn.Module, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        queries = model.query_tokens.expand(states.shape[0], -1, -1)
        out = model.qformer(query_embeds=queries, encoder_hidden_states=states, encoder_attention_mask=mask)
        return normalised(model.vision_projection(out.last_hidden_state.to(model.vision_projection.weight.dtype)))

    @staticmethod
    def _text_features(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = model.qformer(query_embeds=model.embeddings(input_ids=ids), query_length=0, attention_mask=mask)
        return normalised(model.text_projection(out.last_hidden_state[:, 0, :].to(model.text_projection.weight.dtype)))

    @staticmethod
    def _itm_logits(
        model: nn.Module, states: torch.Tensor, image_mask: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """ITM logits (no match, match) of each pair: queries and text together, averaged over the queries."""
        queries = model.query_tokens.expand(states.shape[0], -1, -1)
        n_queries = queries.shape[1]
        query_mask = torch.ones(queries.shape[:-1], dtype=mask.dtype, device=mask.device)
        out = model.qformer(
            query_embeds=model.embeddings(input_ids=ids, query_embeds=queries),
            query_length=n_queries,
            attention_mask=torch.cat([query_mask, mask], dim=1),
            encoder_hidden_states=states,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        return model.itm_head(out[:, :n_queries, :].to(model.itm_head.weight.dtype)).mean(dim=1)

    def _image_states(self, loaded: LoadedModel, images: list) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = pixel_values(loaded.processor, images, loaded.model.dtype).to(loaded.model.device)
        return self._vision(loaded.model, pixels)

    def embed_images(self, loaded: LoadedModel, images: list) -> torch.Tensor:
        """Normalised projected query outputs, shape (images, num_query_tokens, image_text_hidden_size)."""
        return self._image_features(loaded.model, *self._image_states(loaded, images))

    def embed_texts(self, loaded: LoadedModel, texts: list[str]) -> torch.Tensor:
        inputs = self._text_inputs(loaded, texts)
        return self._text_features(loaded.model, inputs["input_ids"], inputs["attention_mask"])

    def similarity(self, loaded: LoadedModel, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """ITC score of each (image, text): the largest cosine between the text and one of the image's queries.

        A NaN image (one that could not be embedded) scores NaN with every text.
        """
        blocks = [
            (image_emb[s : s + _SIMILARITY_BLOCK] @ text_emb.T).amax(dim=1)
            for s in range(0, image_emb.shape[0], _SIMILARITY_BLOCK)
        ]
        return torch.cat(blocks) if blocks else image_emb.new_zeros((0, text_emb.shape[0]))

    def match(self, loaded: LoadedModel, images: list, texts: list[str]) -> torch.Tensor:
        inputs = self._text_inputs(loaded, texts)
        states, image_mask = self._image_states(loaded, images)
        logits = self._itm_logits(loaded.model, states, image_mask, inputs["input_ids"], inputs["attention_mask"])
        return logits[:, 1].float()
