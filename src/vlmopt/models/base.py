"""The family adapter interface and the loaded-model handle shared by every stage."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmopt.parts import PARTS

__all__ = ["PARTS", "Encoded", "FamilyAdapter", "LoadedModel"]


@dataclass
class Encoded:
    """Model inputs for one batch, and where the prompt ends in ``input_ids``."""

    inputs: dict[str, torch.Tensor]
    prompt_length: int


class FamilyAdapter:
    """Everything family-specific: building, parts, prompts, encoding and generation.

    Compressors, finetuning and inference talk to models only through this interface, so adding
    a family is one module and one registry entry.
    """

    name: str = ""
    tasks: tuple[str, ...] = ()
    #: Prompt templates per task; ``{question}`` is filled in for VQA.
    prompts: dict[str, str] = {}
    #: True when :meth:`encode` needs each image together with its text (the token sequence follows
    #: the image's patch grid, or the prompt is drawn into the image), so training cannot
    #: preprocess images once, apart from their text, and reuse the tensors.
    encodes_image_with_text: bool = False
    #: Whether ``generate`` works with transformers' static KV cache (``cache_implementation="static"``),
    #: with the same predictions as the default dynamic cache (:func:`vlmopt.infer.cache_kwargs`).
    static_cache: bool = True

    #: The transformers model class of the family's checkpoints (what :meth:`from_pretrained` loads).
    model_class: type[nn.Module] | None = None

    def tiny(self, texts: list[str], *, seed: int = 0, image_size: int = 64) -> LoadedModel:
        raise NotImplementedError

    def skeleton(self, config: Any) -> nn.Module:
        """The family's model built from a transformers ``config`` on the meta device: every module
        and parameter shape, no weight values, no memory (for checks that need only the structure)."""
        if self.model_class is None:
            raise NotImplementedError(f"family {self.name!r} names no model class")
        with torch.device("meta"):
            return self.model_class(config)

    def from_pretrained(self, source: str, **kwargs: Any) -> LoadedModel:
        raise NotImplementedError

    def parts(self, model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
        """Ordered transformer layers of each part as (dotted name, module)."""
        raise NotImplementedError

    def prompt(self, task: str, question: str | None = None) -> str:
        if task not in self.prompts:
            raise ValueError(f"family {self.name!r} cannot run task {task!r}; it supports {sorted(self.prompts)}")
        return self.prompts[task].format(question=question or "")

    def encode(
        self, loaded: LoadedModel, images: list | None, prompts: list[str], targets: list[str] | None = None
    ) -> Encoded:
        """Token ids (and labels when ``targets`` are given) plus ``pixel_values`` unless ``images`` is None."""
        raise NotImplementedError

    def generate(self, loaded: LoadedModel, encoded: Encoded, **generate_kwargs: Any) -> list[str]:
        raise NotImplementedError

    #: Tasks whose examples finetuning and LoRA train on by default (None: every task in ``tasks``).
    train_tasks: tuple[str, ...] | None = None

    def loss(self, loaded: LoadedModel, encoded: Encoded) -> torch.Tensor:
        """Training loss of a batch encoded with targets (the model's own loss on ``labels`` by default)."""
        return loaded.model(**encoded.inputs).loss

    # Image-text similarity (retrieval, zero-shot classification): families with a contrastive head.

    #: Whether :meth:`match` scores image-text pairs with a matching (ITM) head.
    matches: bool = False

    def embed_images(self, loaded: LoadedModel, images: list) -> torch.Tensor:
        """L2-normalised image embeddings, one entry per image, in the space :meth:`embed_texts` shares.

        An entry is one row, or for a family that represents an image by several vectors (BLIP-2's
        query outputs) a (vectors, dim) matrix; :meth:`similarity` reduces either to one score per text.
        """
        raise NotImplementedError(f"family {self.name!r} has no image-text embedding (tasks: {list(self.tasks)})")

    def embed_texts(self, loaded: LoadedModel, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings, one row per text."""
        raise NotImplementedError(f"family {self.name!r} has no image-text embedding (tasks: {list(self.tasks)})")

    def similarity(self, loaded: LoadedModel, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Contrastive (ITC) score of every (image, text), shape (n_images, n_texts): the cosine by default."""
        return image_emb @ text_emb.T

    def match(self, loaded: LoadedModel, images: list, texts: list[str]) -> torch.Tensor:
        """Matching score of each pair (``images[i]``, ``texts[i]``): the ITM head's "match" logit."""
        raise NotImplementedError(f"family {self.name!r} has no image-text matching head")


@dataclass
class LoadedModel:
    """A model, its processor and its family adapter, as returned by ``load_model``."""

    model: nn.Module
    processor: Any
    family: str
    adapter: FamilyAdapter = field(repr=False)
    source: str = ""

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def parts(self) -> dict[str, list[tuple[str, nn.Module]]]:
        return self.adapter.parts(self.model)

    def save(self, path: str | Path, *, state_dict: dict[str, Any] | None = None) -> Path:
        """Save model (safetensors), processor and a ``vlmopt.json`` naming the family; ``state_dict``
        replaces the model's own tensors in the files (packed weights)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
        self.processor.save_pretrained(path)
        (path / "vlmopt.json").write_text(json.dumps({"family": self.family, "source": self.source}, indent=2))
        return path
