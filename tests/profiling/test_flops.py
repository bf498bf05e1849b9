"""FLOP counts: exact matrix-product counts, tiny OPT generation, and the lower-bound note for int8."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlmopt.profiling.flops import count_flops, forward_flops, generation_flops, uncounted_modules


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))


def test_linear_counts_two_flops_per_multiply_add():
    layer = nn.Linear(64, 32)
    layer.train()
    result = forward_flops(layer, torch.randn(4, 64))
    assert result.total_flops == 2 * 4 * 64 * 32
    assert result.by_operator == {"aten.addmm": 2 * 4 * 64 * 32}
    assert result.unit == "FLOP" and "FlopCounterMode" in result.method and result.note is None
    # Mode and gradient flags are restored.
    assert layer.training and all(p.requires_grad for p in layer.parameters())


def test_two_layers_sum():
    model = mlp()
    model[2].weight.requires_grad_(False)
    x = torch.randn(4, 64)
    total = forward_flops(model, x).total_flops
    assert total == 2 * 4 * 64 * 32 + 2 * 4 * 32 * 8
    assert total == forward_flops(model[0], x).total_flops + forward_flops(model[2], torch.randn(4, 32)).total_flops
    assert model[0].weight.requires_grad and not model[2].weight.requires_grad


def test_plain_function_and_cpu_attention():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    assert count_flops(lambda: a @ b).total_flops == 2 * 3 * 5 * 7
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 4)
    fused = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    expected = 2 * 6 * 5 * 6 * 8 + 2 * 6 * 5 * 6 * 4  # Q K^T and P V over 2 x 3 heads
    assert fused.total_flops == expected
    explicit = count_flops(lambda: torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v)
    assert explicit.total_flops == expected


# Tiny OPT: vocab 50, hidden 16, 2 layers, 2 heads (head dim 8), ffn 32.
V, H, L, HEADS, FFN = 50, 16, 2, 2, 32


def tiny_opt(attn: str = "sdpa"):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=V,
        hidden_size=H,
        num_hidden_layers=L,
        ffn_dim=FFN,
        num_attention_heads=HEADS,
        max_position_embeddings=64,
        word_embed_proj_dim=H,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    return OPTForCausalLM(config)


def expected_opt_flops(batch: int, prompt: int, new_tokens: int) -> tuple[int, float]:
    """Prefill and mean per-token FLOPs of greedy generation with a KV cache, by hand."""
    per_token_linear = L * (4 * 2 * H * H + 2 * 2 * H * FFN)  # q, k, v, out; fc1, fc2
    lm_head = 2 * H * V  # logits of the last position only

    def attention(queries: int, keys: int) -> int:
        return L * 2 * (2 * HEADS * queries * keys * (H // HEADS))

    prefill = batch * (prompt * per_token_linear + lm_head + attention(prompt, prompt))
    steps = [batch * (per_token_linear + lm_head + attention(1, prompt + 1 + i)) for i in range(new_tokens)]
    return prefill, sum(steps) / new_tokens


def opt_inputs(batch: int, prompt: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, V, (batch, prompt), generator=torch.Generator().manual_seed(prompt))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module")
def opt():
    return tiny_opt()


def test_generation_flops_of_a_tiny_opt(opt):
    result = generation_flops(opt, opt_inputs(2, 7), new_tokens=3)
    prefill, per_token = expected_opt_flops(2, 7, 3)
    assert result.prefill_flops == prefill
    assert result.flops_per_token == per_token > 0
    assert result.total_flops(4) == prefill + 3 * per_token
    assert "max_new_tokens=4" in result.method and result.note is None
    assert all(p.requires_grad for p in opt.parameters())  # restored after counting


def test_prefill_grows_with_the_prompt(opt):
    short = generation_flops(opt, opt_inputs(1, 4), new_tokens=2)
    long = generation_flops(opt, opt_inputs(1, 12), new_tokens=2)
    assert long.prefill_flops == expected_opt_flops(1, 12, 2)[0]
    assert long.prefill_flops > 2.5 * short.prefill_flops
    assert long.flops_per_token > short.flops_per_token  # the attention context is longer


def test_eager_and_fused_attention_count_the_same():
    inputs = opt_inputs(2, 5)
    eager = generation_flops(tiny_opt("eager"), inputs, new_tokens=2)
    fused = generation_flops(tiny_opt("sdpa"), inputs, new_tokens=2)
    assert (eager.prefill_flops, eager.flops_per_token) == (fused.prefill_flops, fused.flops_per_token)


def test_stepwise_counting_matches_generate(opt):
    def prefill(model, inputs):
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), inputs["attention_mask"]

    def step(model, state):
        past, token, mask = state
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        out = model(input_ids=token, attention_mask=mask, past_key_values=past, use_cache=True)
        return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), mask

    inputs = opt_inputs(2, 6)
    manual = generation_flops(opt, inputs, new_tokens=3, prefill_fn=prefill, step_fn=step)
    generated = generation_flops(opt, inputs, new_tokens=3)
    assert (manual.prefill_flops, manual.flops_per_token) == (generated.prefill_flops, generated.flops_per_token)
    assert "step_fn 3 times" in manual.method


def test_generation_arguments_are_checked(opt):
    with pytest.raises(ValueError, match="remove \\['max_new_tokens'\\]"):
        generation_flops(opt, opt_inputs(1, 4), generate_kwargs={"max_new_tokens": 5})
    with pytest.raises(ValueError, match="both prefill_fn and step_fn"):
        generation_flops(opt, opt_inputs(1, 4), prefill_fn=lambda m, i: None)
    with pytest.raises(ValueError, match="new_tokens must be an integer >= 1"):
        generation_flops(opt, opt_inputs(1, 4), new_tokens=0)
    with pytest.raises(ValueError, match="has no generate"):
        generation_flops(mlp(), torch.randn(1, 64))


def test_dynamic_int8_is_marked_as_a_lower_bound():
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    assert uncounted_modules(quantized) == ["0", "2"]
    result = forward_flops(quantized, torch.randn(4, 64))
    assert result.total_flops == 0  # the int8 linears are invisible to the counter
    assert result.note.startswith("lower bound: FlopCounterMode does not count 2 quantized module(s)")
    assert result.note.endswith(": 0, 2")
    assert forward_flops(model, torch.randn(4, 64)).note is None


def test_torchao_tensor_subclasses_are_detected():
    quantization = pytest.importorskip("torchao.quantization")
    model = mlp()
    config = quantization.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    quantization.quantize_(model, config, filter_fn=lambda module, fqn: fqn == "2")
    assert uncounted_modules(model) == ["2"]
    result = forward_flops(model, torch.randn(4, 64))
    assert result.total_flops == 2 * 4 * 64 * 32  # only the float layer
    assert result.note.startswith("lower bound: FlopCounterMode does not count 1 quantized module(s)")
    assert result.note.endswith("torchao tensor subclasses): 2")
