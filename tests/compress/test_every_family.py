"""Every compression method on every family's tiny model: the manifest counts what the architecture has.

The expected counts come from each model's config (layers per stack, cross-attention frequency,
gated or plain MLP) times the Linear modules one layer of that architecture holds, read off the
transformers modeling files, never from the selection code under test.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from vlmopt.compress import METHODS
from vlmopt.models import FAMILIES, load_model
from vlmopt.pipeline import compress_loaded

SELF, CROSS, MLP = ("attention", "self"), ("attention", "cross"), ("mlp", None)


def _layer(self_attention: int, mlp: int, cross: int = 0) -> Counter:
    return Counter({SELF: self_attention, CROSS: cross, MLP: mlp})


# One layer of each architecture (modeling_<name>.py in transformers 5).
VIT_FUSED = _layer(2, 2)  # BLIP / BLIP-2 ViT: self_attn.qkv, self_attn.projection; mlp.fc1, mlp.fc2
CLIP_VIT = _layer(4, 2)  # q_proj, k_proj, v_proj, out_proj; fc1, fc2 (also GIT's and LLaVA's vision towers)
BERT = _layer(4, 2)  # attention.self.{query,key,value}, attention.output.dense; intermediate, output
BERT_CROSS = _layer(4, 2, cross=4)  # + crossattention.self.{query,key,value}, crossattention.output.dense
OPT = _layer(4, 2)  # self_attn.{q,k,v,out}_proj; fc1, fc2
LLAMA = _layer(4, 3)  # self_attn.{q,k,v,o}_proj; mlp.{gate,up,down}_proj (Llama, Qwen2.5 text)
QWEN_VIT = _layer(2, 3)  # attn.qkv, attn.proj; mlp.{gate,up,down}_proj
PERSIMMON = _layer(2, 2)  # self_attn.query_key_value, self_attn.dense; mlp.dense_h_to_4h, dense_4h_to_h


def _t5_mlp(config) -> int:
    return 3 if config.feed_forward_proj.startswith("gated") else 2  # wi_0, wi_1, wo or wi, wo


def _qformer(config) -> list[Counter]:
    # Blip2QFormerLayer: attention (4), crossattention every cross_attention_frequency layers (4),
    # intermediate_query.dense and output_query.dense, and with use_qformer_text_input (the retrieval
    # Q-Former, which also runs text) the text feed-forward intermediate.dense and output.dense.
    q = config.qformer_config
    mlp = 4 if q.use_qformer_text_input else 2
    return [_layer(4, mlp, cross=4 if i % q.cross_attention_frequency == 0 else 0) for i in range(q.num_hidden_layers)]


def _stacks(family: str, config) -> dict[str, list[Counter]]:
    """Per part, the Linear counts of each layer in order."""
    vision = getattr(config, "vision_config", None)
    text = getattr(config, "text_config", None)
    if family in ("blip", "blip-itm"):
        return {"vision": [VIT_FUSED] * vision.num_hidden_layers, "language": [BERT_CROSS] * text.num_hidden_layers}
    if family == "blip2-opt":
        return {
            "vision": [VIT_FUSED] * vision.num_hidden_layers,
            "bridge": _qformer(config),
            "language": [OPT] * text.num_hidden_layers,
        }
    if family == "blip2-itm":
        return {"vision": [VIT_FUSED] * vision.num_hidden_layers, "bridge": _qformer(config)}
    if family == "blip2-t5":
        mlp = _t5_mlp(text)
        return {
            "vision": [VIT_FUSED] * vision.num_hidden_layers,
            "bridge": _qformer(config),
            "language": [_layer(4, mlp)] * text.num_layers + [_layer(4, mlp, cross=4)] * text.num_decoder_layers,
        }
    if family == "clip":
        return {"vision": [CLIP_VIT] * vision.num_hidden_layers, "language": [CLIP_VIT] * text.num_hidden_layers}
    if family == "git":
        return {"vision": [CLIP_VIT] * vision.num_hidden_layers, "language": [BERT] * config.num_hidden_layers}
    if family == "llava":
        return {"vision": [CLIP_VIT] * vision.num_hidden_layers, "language": [LLAMA] * text.num_hidden_layers}
    if family == "pix2struct":
        # Pix2StructVisionLayer: attention.{query,key,value,output}, mlp.{wi_0,wi_1,wo}; the text layer adds
        # encoder_decoder_attention.
        return {
            "vision": [_layer(4, 3)] * vision.num_hidden_layers,
            "language": [_layer(4, 3, cross=4)] * text.num_layers,
        }
    if family == "qwen2_5_vl":
        return {"vision": [QWEN_VIT] * vision.depth, "language": [LLAMA] * text.num_hidden_layers}
    if family == "fuyu":
        return {"language": [PERSIMMON] * text.num_hidden_layers}
    raise KeyError(f"no architecture description for family {family!r}: add one to this test")


def _total(stacks: dict[str, list[Counter]], roles=(SELF, CROSS, MLP)) -> Counter:
    out = Counter()
    for part, layers in stacks.items():
        for layer in layers:
            for key in roles:
                if layer[key]:
                    out[(part, *key)] += layer[key]
    return out


def _recorded(step: dict) -> Counter:
    return Counter((m["part"], m["role"], m.get("attention_kind")) for m in step["modules"])


#: Methods that cannot run on a family, with the reason (the step must fail with a clear error).
NOT_APPLICABLE = {
    ("lora", family): "the BLIP-2 retrieval model has no language part for this test's LoRA step"
    for family in ("blip2-itm",)
} | {
    ("prune_layers", "blip2-itm"): "this test's prune_layers step drops a language layer; the BLIP-2 retrieval "
    "model has no language model (its Q-Former layers are pruned in tests/models/test_blip2_itm.py)",
}


def _steps(dataset: str) -> dict[str, list[dict]]:
    calibration = {"dataset": dataset, "split": "train", "n": 4, "batch_size": 4}
    return {
        "uniform": [{"method": "uniform", "bits": 4, "part": "all"}],
        "dynamic_int8": [{"method": "dynamic_int8", "part": "all", "backend": "fbgemm"}],
        "gptq": [{"method": "gptq", "bits": 4, "group_size": 16, "part": "all", "calibration": calibration}],
        "awq": [{"method": "awq", "bits": 4, "group_size": 16, "part": "all", "calibration": calibration}],
        "svd": [{"method": "svd", "ratio": 0.5, "part": "all", "role": "mlp"}],
        "prune_layers": [{"method": "prune_layers", "part": "language", "drop_last": 1}],
        "prune_heads": [{"method": "prune_heads", "part": "all", "heads": 1}],
        "lora": [
            {
                "method": "lora",
                "part": "language",
                "r": 2,
                "dataset": dataset,
                "training": {"max_steps": 2, "batch_size": 4},
            }
        ],
        "precision": [{"method": "precision", "dtype": "bfloat16"}],
    }


def test_every_method_has_an_expectation(shapes_root):
    # A new method without steps here fails.
    assert set(_steps(shapes_root.name)) == set(METHODS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, shapes_texts):
    folder = tmp_path_factory.mktemp("families")
    return {f: load_model(f"tiny:{f}", texts=shapes_texts, seed=0).save(folder / f) for f in FAMILIES}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_manifest_counts_what_the_architecture_has(family, method, sources, shapes_root, tmp_path):
    loaded = load_model(sources[family])
    stacks = _stacks(family, loaded.model.config)
    steps = _steps(shapes_root.name)[method]
    if (method, family) in NOT_APPLICABLE:
        with pytest.raises((ValueError, NotImplementedError)):
            compress_loaded(loaded, tmp_path / "v", steps=steps, data_root=shapes_root.parent, source=sources[family])
        pytest.xfail(NOT_APPLICABLE[(method, family)])
    manifest = compress_loaded(
        loaded, tmp_path / "v", steps=steps, data_root=shapes_root.parent, source=sources[family]
    )
    recorded = _recorded(manifest["steps"][0])
    if method in ("uniform", "dynamic_int8", "gptq", "awq"):
        assert recorded == _total(stacks)
    elif method == "svd":
        assert recorded == _total(stacks, roles=(MLP,))
    elif method == "prune_layers":
        # The last language layer's Linears are removed, and the model has one language layer less.
        assert recorded == _total({"language": stacks["language"][-1:]})
        assert len(loaded.parts()["language"]) == len(stacks["language"]) - 1
    elif method == "prune_heads":
        assert recorded == _total(stacks, roles=(SELF, CROSS))
    elif method == "lora":
        assert recorded == _total({"language": stacks["language"]})
    elif method == "precision":
        assert recorded == _total(stacks)
        kept = tuple(manifest["steps"][0]["structure"]["kept_float32"])
        for name, p in loaded.model.named_parameters():
            assert p.dtype == (torch.float32 if kept and name.startswith(kept) else torch.bfloat16), name
    else:
        raise AssertionError(f"no expectation for {method}")
