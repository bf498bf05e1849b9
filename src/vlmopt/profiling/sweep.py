"""Profiling sweeps: one setting changed at a time, each value a separate measurement.

A study's ``profiling.sweep`` maps an axis to its values; every (axis, value) is a
:class:`SweepPoint`, measured apart (one job each) with everything else as in the variant's own
profile, so that a curve over one axis holds the others fixed:

- ``image_size``: the longest side, in pixels, of the images handed to the processor (resized
  with the aspect kept, as the profiling study's thumbnails). Families that resize every image to
  a fixed input (BLIP, BLIP-2, CLIP, LLaVA, GIT; Pix2Struct's fixed patch count) see the same
  tensor whatever the value, Qwen2.5-VL and Fuyu more patches and image tokens; the rows'
  ``pixel_values_per_sample`` shows what the model received.
- ``prompt_length``: text tokens of each prompt, reached with filler words before the task's
  prompt (``prompt_tokens_per_sample`` is the count reached; a prompt already longer is kept).
- ``batch_size``: samples per timed call.
- ``dtype``: the weights (and so the activations) cast to float32, float16 or bfloat16.
- ``attn_implementation``: ``eager``, ``sdpa`` or ``flash_attention_2`` set on the loaded model;
  a model part that keeps another implementation (BLIP's text and vision models support only
  eager) is named in the rows' note, and a point that changes no part is not measured.
- ``compile``: ``torch.compile`` of each transformer layer of the adapter's parts (regional
  compilation; ``generate`` of the composite models calls their parts, not ``forward``), with
  ``profiling.compile_backend``. Compilation happens in the first call, reported as
  ``first_call_ms`` and excluded from the timed calls.

A point that cannot apply to a variant (flash attention without flash_attn or a GPU, a dtype cast
of int8 kernels) gives rows whose values are None and whose note says why, never a number that was
not measured.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from transformers import PreTrainedModel

from vlmopt.device import cpu_only_reason, model_device
from vlmopt.models.base import LoadedModel
from vlmopt.models.encoding import text_ids
from vlmopt.study.sweep import ATTENTION, AXES, SweepPoint, sweep_points

__all__ = [
    "ATTENTION",
    "AXES",
    "DTYPES",
    "Applied",
    "SweepPoint",
    "apply_point",
    "compiled_graphs",
    "lengthen_prompts",
    "resize_longest",
    "sweep_points",
    "sweep_rows",
]

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resize_longest(images: list, size: int) -> list:
    """Each image resized (bicubic) so that its longest side is ``size`` pixels, the aspect ratio kept."""
    out = []
    for image in images:
        w, h = image.size
        scale = size / max(w, h)
        out.append(image.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample=3))
    return out


_FILLER_WORDS = ("the", "a", "image", "photo")


def _filler_word(tokenizer: Any) -> str:
    """A word the tokenizer encodes, after a space, as one known token (the first that does)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    for word in _FILLER_WORDS:
        ids = text_ids(tokenizer, f"x {word} {word}")
        if len(ids) >= 3 and ids[-1] == ids[-2] != unk:
            return word
    return _FILLER_WORDS[0]


def lengthen_prompts(tokenizer: Any, prompts: list[str], tokens: int) -> tuple[list[str], list[int]]:
    """Each prompt preceded by filler words until it has at least ``tokens`` text tokens.

    Returns the prompts and their text-token counts (a prompt already longer is unchanged; a
    tokenizer that merges filler words may overshoot by a token or two, and the count says so).
    """
    word = _filler_word(tokenizer)
    out, counts = [], []
    for prompt in prompts:
        n = len(text_ids(tokenizer, prompt))
        k = max(0, tokens - n)
        text = prompt
        while k > 0:
            text = " ".join([word] * k) + (" " + prompt if prompt else "")
            n = len(text_ids(tokenizer, text))
            if n >= tokens:
                break
            k += tokens - n
        out.append(text)
        counts.append(n)
    return out, counts


@dataclass
class Applied:
    """What a sweep point changed: settings and inputs for the measurement, or why it cannot apply."""

    settings: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None
    prompt_length: int | None = None
    #: Why the point cannot be measured on this variant (its rows are then None).
    reason: str | None = None
    #: What changed on the model, for the rows' method column.
    method: str = ""
    #: A caveat for every row (parts that kept another attention implementation).
    note: str | None = None


def _attention_of(model: torch.nn.Module) -> dict[str, str]:
    """The attention implementation of the model and of each sub-model with its own config."""
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if impl is not None and isinstance(module, PreTrainedModel):
            found[name or type(module).__name__] = impl
    return found


def apply_point(loaded: LoadedModel, point: SweepPoint, *, model_dir: Any = None, compile_backend: str) -> Applied:
    """Change ``loaded`` (dtype, attention, compilation) or the measurement's inputs for ``point``."""
    axis, value = point.axis, point.value
    if axis == "batch_size":
        return Applied(settings={"batch_size": value}, method=f"batch size {value}")
    if axis == "image_size":
        return Applied(image_size=value, method=f"images resized to a longest side of {value} px")
    if axis == "prompt_length":
        return Applied(prompt_length=value, method=f"prompts lengthened to {value} text tokens")
    if axis == "dtype":
        reason = cpu_only_reason(loaded.model, model_dir)
        if reason and value != "float32":
            return Applied(reason=f"dtype {value} does not apply: {reason}")
        loaded.model.to(DTYPES[value])
        return Applied(method=f"model cast to {value}")
    if axis == "attn_implementation":
        return _set_attention(loaded, value)
    if axis == "compile":
        return _compile(loaded, value, compile_backend)
    raise ValueError(f"unknown profiling sweep axis {axis!r}")


def _set_attention(loaded: LoadedModel, value: str) -> Applied:
    if value == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            return Applied(reason="flash_attention_2 does not apply: the flash_attn package is not installed")
        if model_device(loaded.model).type != "cuda":
            return Applied(reason="flash_attention_2 does not apply: it runs on CUDA devices only")
    try:
        loaded.model.set_attn_implementation(value)
    except (ValueError, ImportError) as exc:
        return Applied(reason=f"{value} does not apply: {exc}")
    now = _attention_of(loaded.model)
    kept = {name: impl for name, impl in now.items() if impl != value}
    if len(kept) == len(now):
        return Applied(reason=f"{value} does not apply: every part keeps its attention ({_describe(now)})")
    note = f"parts that keep another attention implementation: {_describe(kept)}" if kept else None
    return Applied(method=f"attention {_describe(now)}", note=note)


def _describe(impls: dict[str, str]) -> str:
    return ", ".join(f"{name}={impl}" for name, impl in impls.items())


def _compile(loaded: LoadedModel, value: bool, backend: str) -> Applied:
    if not value:
        return Applied(method="not compiled")
    layers = [module for part in loaded.parts().values() for _, module in part]
    if not layers:
        return Applied(reason="compile does not apply: the family names no transformer layers to compile")
    torch._dynamo.reset()
    for module in layers:
        module.compile(backend=backend, dynamic=True)
    return Applied(method=f"torch.compile (backend {backend}, dynamic shapes) of {len(layers)} transformer layers")


def compiled_graphs() -> int:
    """Graphs torch.compile has built since the last ``torch._dynamo.reset()``."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def sweep_rows(df: pd.DataFrame, applied: Applied, sweep: SweepPoint, graphs: int) -> pd.DataFrame:
    """A sweep point's rows: what the point changed in ``method``, its caveat in ``note``, compiled graphs."""
    df = df.copy()
    if applied.method:
        df["method"] = applied.method + "; " + df["method"].fillna("")
    if applied.note:
        df["note"] = [applied.note if pd.isna(n) else f"{n}; {applied.note}" for n in df["note"]]
    if sweep.axis == "compile" and sweep.value:
        extra = df.iloc[[0]].copy()
        extra[["measure", "value", "unit", "method", "note"]] = [
            "compiled_graphs",
            float(graphs),
            "graphs",
            "graphs torch.compile built during this task's calls (torch._dynamo counters)",
            None,
        ]
        df = pd.concat([df, extra], ignore_index=True)
    return df
