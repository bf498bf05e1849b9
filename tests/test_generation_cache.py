"""The static KV cache (vlmopt.infer.cache_kwargs) gives the default path's predictions on every
generative family, and inference uses it when asked (VLMOPT_CACHE) or on a GPU (auto)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlmopt.infer import cache_kwargs, predict
from vlmopt.models import load_model

FAMILIES = ["blip", "blip2-opt", "blip2-t5", "git", "llava", "qwen2_5_vl", "pix2struct", "fuyu"]
GREEDY = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "num_beams": 1}


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


def _record_caches(loaded, monkeypatch) -> list:
    """The cache_implementation of each model.generate call, in order."""
    seen = []
    original = loaded.model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("cache_implementation"))
        return original(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "generate", spy)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_predictions_equal_the_default(family, monkeypatch):
    loaded = load_model(f"tiny:{family}")
    task = "captioning" if "captioning" in loaded.adapter.tasks else loaded.adapter.tasks[0]
    encoded = loaded.adapter.encode(loaded, _images(3), [loaded.adapter.prompt(task)] * 3)
    static = cache_kwargs(loaded, "static")
    assert static == ({"cache_implementation": "static"} if loaded.adapter.static_cache else {})
    seen = _record_caches(loaded, monkeypatch)
    default = loaded.adapter.generate(loaded, encoded, **GREEDY)
    assert loaded.adapter.generate(loaded, encoded, **GREEDY, **static) == default
    assert seen == [None, static.get("cache_implementation")]
    # The two families whose generate fails with a static cache keep the dynamic one.
    assert loaded.adapter.static_cache == (family not in ("blip", "git"))


def test_beam_search_with_a_static_cache_equals_the_default():
    loaded = load_model("tiny:blip2-opt")
    encoded = loaded.adapter.encode(loaded, _images(2), [loaded.adapter.prompt("captioning")] * 2)
    beams = {**GREEDY, "num_beams": 3}
    assert loaded.adapter.generate(loaded, encoded, **beams, cache_implementation="static") == (
        loaded.adapter.generate(loaded, encoded, **beams)
    )


def test_auto_is_dynamic_on_the_cpu_and_the_setting_is_checked(monkeypatch):
    loaded = load_model("tiny:blip2-opt")
    monkeypatch.delenv("VLMOPT_CACHE", raising=False)
    assert cache_kwargs(loaded) == {} and cache_kwargs(loaded, "dynamic") == {}
    monkeypatch.setenv("VLMOPT_CACHE", "static")
    assert cache_kwargs(loaded) == {"cache_implementation": "static"}
    with pytest.raises(ValueError, match="generation cache 'paged' is not one of auto, dynamic, static"):
        cache_kwargs(loaded, "paged")


def test_inference_uses_the_cache_asked_for_with_the_same_predictions(shapes_test, shapes_root, monkeypatch):
    loaded = load_model("tiny:blip2-opt")
    gen = {"max_new_tokens": 5, "num_beams": 1, "do_sample": False}
    seen = _record_caches(loaded, monkeypatch)
    monkeypatch.setenv("VLMOPT_CACHE", "dynamic")
    dynamic = predict(loaded, shapes_test, shapes_root, "captioning", batch_size=8, generate_kwargs=gen, progress=False)
    monkeypatch.setenv("VLMOPT_CACHE", "static")
    static = predict(loaded, shapes_test, shapes_root, "captioning", batch_size=8, generate_kwargs=gen, progress=False)
    assert set(seen) == {None, "static"}
    assert static["prediction"].tolist() == dynamic["prediction"].tolist()
