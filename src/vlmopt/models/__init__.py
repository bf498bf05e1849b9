"""Model families: one adapter per family, and one loader for hub ids, local folders and tiny models.

``load_model("tiny:blip")`` builds a random-init tiny model (with a tokenizer trained offline),
``load_model("Salesforce/blip2-opt-2.7b")`` reads a hub checkpoint, and ``load_model(folder)``
reads anything saved with :meth:`LoadedModel.save`; all three return the same handle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vlmopt.model_source import check_source
from vlmopt.models.base import PARTS, Encoded, FamilyAdapter, LoadedModel
from vlmopt.models.blip import BlipAdapter
from vlmopt.models.blip2 import Blip2OptAdapter
from vlmopt.models.blip2_itm import Blip2ItmAdapter
from vlmopt.models.blip2_t5 import Blip2T5Adapter
from vlmopt.models.blip_itm import BlipItmAdapter
from vlmopt.models.clip import ClipAdapter
from vlmopt.models.fuyu import FuyuAdapter
from vlmopt.models.git import GitAdapter
from vlmopt.models.llava import LlavaAdapter
from vlmopt.models.pix2struct import Pix2StructAdapter
from vlmopt.models.qwen2_5_vl import Qwen25VLAdapter

__all__ = [
    "FAMILIES",
    "PARTS",
    "Encoded",
    "FamilyAdapter",
    "LoadedModel",
    "family_of_config",
    "get_family",
    "load_model",
]

#: Family name -> adapter.
FAMILIES: dict[str, FamilyAdapter] = {
    a.name: a
    for a in (
        BlipAdapter(),
        Blip2OptAdapter(),
        Blip2ItmAdapter(),
        Blip2T5Adapter(),
        BlipItmAdapter(),
        ClipAdapter(),
        FuyuAdapter(),
        GitAdapter(),
        LlavaAdapter(),
        Pix2StructAdapter(),
        Qwen25VLAdapter(),
    )
}
#: transformers ``model_type`` -> family, for the families that one model type identifies.
_MODEL_TYPES = {
    "blip": "blip",
    "clip": "clip",
    "fuyu": "fuyu",
    "git": "git",
    "llava": "llava",
    "pix2struct": "pix2struct",
    "qwen2_5_vl": "qwen2_5_vl",
}
#: Model classes that make a family of their own within a model type (retrieval heads).
_ARCHITECTURES = {"BlipForImageTextRetrieval": "blip-itm", "Blip2ForImageTextRetrieval": "blip2-itm"}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_TINY_TEXTS = (
    "a picture of one red circle on the left",
    "Question: what color are the shapes? Short answer: red",
)


def get_family(name: str) -> FamilyAdapter:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known families: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of_config(config: Any) -> str:
    """Family name of a transformers config (``model_type``, and the language model for BLIP-2)."""
    model_type = getattr(config, "model_type", None)
    for architecture in getattr(config, "architectures", None) or ():
        if architecture in _ARCHITECTURES:
            return _ARCHITECTURES[architecture]
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    if model_type == "blip-2":
        text_type = getattr(config.text_config, "model_type", "")
        if text_type in ("opt", "t5"):
            return f"blip2-{text_type}"
        raise ValueError(f"BLIP-2 with a {text_type!r} language model is not supported (supported: opt, t5)")
    raise ValueError(f"model_type {model_type!r} is not a supported family; supported: {sorted(FAMILIES)}")


def load_model(
    source: str | Path,
    *,
    dtype: str | None = None,
    texts: list[str] | None = None,
    seed: int = 0,
    image_size: int = 64,
    trust_remote_code: bool = False,
    config_overrides: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Load a model from ``tiny:<family>``, a local folder, or a hub id.

    ``texts`` trains the tiny model's tokenizer (the dataset's captions and questions); ``dtype``
    is one of float32, float16, bfloat16 (default: the checkpoint's own). ``config_overrides``
    replace values of a saved model's config as ``from_pretrained`` reads it (the folder is not
    changed).
    """
    source = str(source)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if source.startswith("tiny:"):
        family = get_family(source.removeprefix("tiny:"))
        loaded = family.tiny(list(texts or DEFAULT_TINY_TEXTS), seed=seed, image_size=image_size)
        if dtype is not None:
            loaded.model.to(DTYPES[dtype])
        return loaded
    from transformers import AutoConfig

    check_source(source)
    path = Path(source).expanduser()
    if path.is_dir():
        source = str(path)
    marker = path / "vlmopt.json"
    if marker.is_file():
        family = get_family(json.loads(marker.read_text())["family"])
    else:
        family = get_family(family_of_config(AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)))
    kwargs: dict[str, Any] = {**(config_overrides or {}), "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = DTYPES[dtype]
    loaded = family.from_pretrained(source, **kwargs)
    loaded.source = source
    return loaded
