"""A model's structure without its weights, for checks made before any job runs.

:func:`model_skeleton` builds the model a study names with every parameter on the ``meta``
device (no memory, no weight values), from what is on this machine: a tiny family's own
configuration, a local folder's ``config.json``, or a hub model's configuration where the hub
cache already holds it. A hub model whose configuration is not cached is not downloaded to be
checked (planning stays offline): :func:`model_skeleton` returns None, and the checks happen
when the model is loaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from vlmopt.model_source import check_source, source_kind
from vlmopt.models.base import FamilyAdapter

__all__ = ["model_skeleton"]

log = logging.getLogger(__name__)


def model_skeleton(
    source: str, *, image_size: int = 64, trust_remote_code: bool = False
) -> tuple[FamilyAdapter, nn.Module] | None:
    """(family adapter, model) of ``source`` built without weights, or None where it needs a download.

    A tiny model is built as the study builds it (random weights, on the CPU: it is small); other
    models are built on the meta device. A local folder that does not exist is a FileNotFoundError.
    """
    from transformers import AutoConfig

    from vlmopt.models import DEFAULT_TINY_TEXTS, family_of_config, get_family

    kind = source_kind(source)
    if kind == "tiny":
        family = get_family(source.removeprefix("tiny:"))
        return family, family.tiny(list(DEFAULT_TINY_TEXTS), image_size=image_size).model
    check_source(source)
    location = str(Path(source).expanduser()) if kind == "folder" else source
    try:
        config = AutoConfig.from_pretrained(location, local_files_only=True, trust_remote_code=trust_remote_code)
    except OSError:
        log.info("%s: configuration not in the hub cache; its variants are checked when it is loaded", source)
        return None
    marker = Path(location) / "vlmopt.json"
    name = json.loads(marker.read_text())["family"] if marker.is_file() else family_of_config(config)
    family = get_family(name)
    return family, family.skeleton(config)
