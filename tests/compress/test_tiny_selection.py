"""On the real tiny BLIP-2 and BLIP, a selection changes exactly the weights it names, no more, no less.

The scripts vlmopt replaces had a "language + attention" setting that quantized nothing; here the
changed weights are found by comparing state dicts before and after, not by asking the selector.
"""

from __future__ import annotations

import re

import pytest
import torch

from vlmopt.compress import apply_variant
from vlmopt.models import load_model


@pytest.fixture(scope="module")
def blip2(shapes_texts):
    return load_model("tiny:blip2-opt", texts=shapes_texts, seed=0)


@pytest.fixture(scope="module")
def blip(shapes_texts):
    return load_model("tiny:blip", texts=shapes_texts, seed=0)


def _changed_weights(loaded, steps) -> set[str]:
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    model = loaded.model
    try:
        manifest = apply_variant(model, loaded.parts(), steps)
        after = model.state_dict()
        changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
        assert changed == {f"{m['name']}.weight" for m in manifest["changed_modules"]}
        return changed
    finally:
        model.load_state_dict(before)


def test_language_attention_is_every_opt_q_k_v_out_projection(blip2):
    changed = _changed_weights(blip2, [{"method": "uniform", "bits": 4, "part": "language", "role": "attention"}])
    n_layers = blip2.model.config.text_config.num_hidden_layers
    expected = {
        f"language_model.model.decoder.layers.{i}.self_attn.{p}.weight"
        for i in range(n_layers)
        for p in ("q_proj", "k_proj", "v_proj", "out_proj")
    }
    assert changed == expected


def test_bridge_cross_attention_is_every_qformer_cross_attention_linear(blip2):
    changed = _changed_weights(blip2, [{"method": "uniform", "bits": 4, "part": "bridge", "role": "cross_attention"}])
    n_layers = blip2.model.config.qformer_config.num_hidden_layers
    expected = {
        f"qformer.encoder.layer.{i}.crossattention.{p}.weight"
        for i in range(n_layers)
        for p in ("attention.query", "attention.key", "attention.value", "output.dense")
    }
    assert changed == expected


def test_bridge_mlp_is_every_qformer_feed_forward(blip2):
    changed = _changed_weights(blip2, [{"method": "uniform", "bits": 4, "part": "bridge", "role": "mlp"}])
    pattern = re.compile(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)(_query)?\.dense\.weight")
    assert changed and all(pattern.fullmatch(k) for k in changed)
    # Every feed-forward Linear of every Q-Former layer, text and query branches alike.
    expected = {k for k, v in blip2.model.state_dict().items() if pattern.fullmatch(k) and v.ndim == 2}
    assert changed == expected


def test_position_list_is_the_union_of_thirds(blip):
    first_last = _changed_weights(
        blip, [{"method": "uniform", "bits": 4, "part": "vision", "position": ["first", "last"], "role": "mlp"}]
    )
    layers = {int(re.search(r"layers\.(\d+)\.", k).group(1)) for k in first_last}
    assert layers == {0, 2}
    assert all(".mlp." in k for k in first_last)


def test_part_list_covers_both_parts(blip2):
    changed = _changed_weights(blip2, [{"method": "uniform", "bits": 8, "part": ["vision", "language"]}])
    assert any(k.startswith("vision_model.") for k in changed)
    assert any(k.startswith("language_model.") for k in changed)
    assert not any(k.startswith("qformer.") for k in changed)


def test_blip_text_decoder_self_and_cross_attention_are_separable(blip):
    self_attn = _changed_weights(blip, [{"method": "uniform", "bits": 4, "part": "language", "role": "self_attention"}])
    cross = _changed_weights(blip, [{"method": "uniform", "bits": 4, "part": "language", "role": "cross_attention"}])
    both = _changed_weights(blip, [{"method": "uniform", "bits": 4, "part": "language", "role": "attention"}])
    assert self_attn and cross and not self_attn & cross
    assert self_attn | cross == both
    assert all(".attention." in k for k in self_attn) and all(".crossattention." in k for k in cross)


@pytest.mark.parametrize(
    "step,match",
    [
        ({"part": "language", "role": []}, "role=\\[\\] selects nothing"),
        ({"part": ["vision", "optics"]}, "part='optics' is not allowed"),
        ({"part": "language", "position": ["first", 3]}, "position=3 is not allowed"),
    ],
)
def test_bad_selector_lists_are_named(blip, step, match):
    with pytest.raises(ValueError, match=match):
        apply_variant(blip.model, blip.parts(), [{"method": "uniform", "bits": 4, **step}])
