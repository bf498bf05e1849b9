"""Floating-point operation counts of a forward pass or of generation, from ``torch.utils.flop_counter``.

``FlopCounterMode`` intercepts the aten operators that run and adds a formula per operator:
matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``), convolutions and the fused GPU
attention kernels, with one multiply-add counted as 2 FLOPs. Element-wise operators, norms and
softmax count nothing, so the totals are matrix-product FLOPs. On the CPU, PyTorch's fused
attention (``_scaled_dot_product_flash_attention_for_cpu``) has no formula in torch; it is counted
here as its two matrix products (``Q K^T`` and ``P V``, the full square, causal or not), the
same value the eager attention path gives. The weight-only low-bit products of packed variants
(``_weight_int4pack_mm``, its CPU version, ``_weight_int8pack_mm``) count as the ``mm`` they replace.

Modules whose kernels the counter cannot see count 0: PyTorch's dynamically quantized int8
modules (``torch.ao.nn.quantized``) and torchao's quantized tensor subclasses. When a model holds
such modules, ``note`` says the count is a lower bound and names them.

Generation (:func:`generation_flops`): ``model.generate`` is counted with ``max_new_tokens=1``
(the prefill: one forward over the prompt that yields the first token) and with
``max_new_tokens=k+1`` (``min_new_tokens`` equal, so no early stop); FLOPs per generated token are
``(total_{k+1} - prefill) / k``, the mean over ``k`` decoding steps with a KV cache (attention
grows with the context, so later tokens cost slightly more). Counts are for the whole batch in
``inputs``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

__all__ = [
    "FlopCount",
    "GenerationFlops",
    "count_flops",
    "forward_flops",
    "generation_flops",
    "uncounted_modules",
]

METHOD = "torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add)"
_QUANTIZED_MODULE_PREFIXES = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")
_LENGTH_KWARGS = ("max_new_tokens", "min_new_tokens", "max_length", "min_length")


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one call: the total and a breakdown by aten operator (``"aten.addmm"`` -> FLOPs)."""

    total_flops: int
    by_operator: dict[str, int] = field(default_factory=dict, hash=False)
    method: str = METHOD
    note: str | None = None
    unit: str = "FLOP"


@dataclass(frozen=True)
class GenerationFlops:
    """FLOPs of generation for one batch: the prefill, and the mean per generated token after it."""

    prefill_flops: int
    flops_per_token: float
    new_tokens: int
    method: str
    note: str | None = None
    unit: str = "FLOP"

    def total_flops(self, generated_tokens: int) -> float:
        """Estimated FLOPs to generate ``generated_tokens`` tokens: the prefill yields the first."""
        if generated_tokens < 1:
            raise ValueError(f"generated_tokens must be >= 1, got {generated_tokens}")
        return self.prefill_flops + self.flops_per_token * (generated_tokens - 1)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """``Q K^T`` plus ``P V`` for query (..., Sq, D), key (..., Sk, D), value (..., Sk, Dv)."""
    batch_heads = math.prod(query_shape[:-2])
    sq, d = query_shape[-2], query_shape[-1]
    sk, dv = key_shape[-2], value_shape[-1]
    return 2 * batch_heads * sq * sk * d + 2 * batch_heads * sq * sk * dv


def _low_bit_mm_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    """A weight-only low-bit product: input (M, K) times a (N, K) weight, output (M, N)."""
    return 2 * math.prod(x_shape) * out_shape[-1]


#: Weight-only low-bit matrix products (vlmopt.compress.kernels): 2 FLOPs per multiply-add, as ``mm``.
_LOW_BIT_MM = ("_weight_int4pack_mm", "_weight_int4pack_mm_for_cpu", "_weight_int8pack_mm")


def _custom_mapping() -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in flop_registry:
        mapping[op] = _cpu_attention_flops
    for name in _LOW_BIT_MM:
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in flop_registry:
            mapping[op] = _low_bit_mm_flops
    return mapping


def uncounted_modules(model: nn.Module) -> list[str]:
    """Names of modules whose computation FlopCounterMode does not count (quantized int8 kernels).

    A module counts when its class comes from ``torch.ao.nn.quantized`` (dynamic or static int8),
    or when one of its own parameters or buffers is a torchao tensor subclass. Children of a
    listed module are not listed again; the root module is named ``<model>``.
    """
    found: list[str] = []
    for name, module in model.named_modules():
        if any(p == "" or name.startswith(p + ".") for p in found):
            continue
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if type(module).__module__.startswith(_QUANTIZED_MODULE_PREFIXES) or any(
            type(t).__module__.split(".")[0] == "torchao" for t in own
        ):
            found.append(name)
    return [name or "<model>" for name in found]


def _lower_bound_note(model: nn.Module | None) -> str | None:
    if model is None:
        return None
    names = uncounted_modules(model)
    if not names:
        return None
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (
        f"lower bound: FlopCounterMode does not count {len(names)} quantized module(s) "
        f"(torch.ao.nn.quantized or torchao tensor subclasses): {shown}"
    )


def count_flops(fn: Callable[[], Any], *, model: nn.Module | None = None) -> FlopCount:
    """FLOPs of one call of ``fn()``; with ``model``, ``note`` flags modules the count misses."""
    if not callable(fn):
        raise ValueError(f"count_flops needs a callable, got {type(fn).__name__}")
    mode = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    with mode:
        fn()
    counts = mode.get_flop_counts().get("Global", {})
    by_operator = {str(op): int(n) for op, n in counts.items()}
    return FlopCount(
        total_flops=int(sum(by_operator.values())),
        by_operator=by_operator,
        note=_lower_bound_note(model),
    )


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd, and parameters without ``requires_grad``; all restored on exit."""
    was_training = model.training
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    try:
        with torch.no_grad():
            yield
    finally:
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        model.train(was_training)


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def forward_flops(model: nn.Module, inputs: Any) -> FlopCount:
    """FLOPs of one forward pass ``model(**inputs)`` (mapping), ``model(*inputs)`` (tuple) or ``model(inputs)``.

    Runs in eval mode under ``torch.no_grad`` with ``requires_grad`` off; the model's mode and
    flags are restored afterwards.
    """
    with _inference(model):
        return count_flops(lambda: _call(model, inputs), model=model)


def _sequences(output: Any) -> torch.Tensor:
    return output.sequences if hasattr(output, "sequences") else output


def generation_flops(
    model: nn.Module,
    inputs: Mapping[str, Any] | torch.Tensor,
    *,
    new_tokens: int = 4,
    generate_kwargs: Mapping[str, Any] | None = None,
    prefill_fn: Callable[[nn.Module, Any], Any] | None = None,
    step_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> GenerationFlops:
    """Prefill FLOPs and mean FLOPs per generated token over ``new_tokens`` decoding steps.

    By default counts ``model.generate(**inputs, **generate_kwargs)`` (greedy unless the kwargs
    say otherwise) as described in the module docstring. A model without ``generate`` can give
    ``prefill_fn(model, inputs) -> state`` and ``step_fn(model, state) -> state`` instead: the
    prefill is counted once and each of ``new_tokens`` steps separately; per token is their mean.
    """
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens must be an integer >= 1, got {new_tokens!r}")
    if (prefill_fn is None) != (step_fn is None):
        raise ValueError("generation_flops: give both prefill_fn and step_fn, or neither (to use model.generate)")
    with _inference(model):
        if prefill_fn is not None and step_fn is not None:
            return _stepwise(model, inputs, new_tokens, prefill_fn, step_fn)
        return _generate(model, inputs, new_tokens, generate_kwargs or {})


def _stepwise(
    model: nn.Module,
    inputs: Any,
    new_tokens: int,
    prefill_fn: Callable[[nn.Module, Any], Any],
    step_fn: Callable[[nn.Module, Any], Any],
) -> GenerationFlops:
    state: list[Any] = [None]

    def prefill() -> None:
        state[0] = prefill_fn(model, inputs)

    def step() -> None:
        state[0] = step_fn(model, state[0])

    first = count_flops(prefill, model=model)
    steps = [count_flops(step).total_flops for _ in range(new_tokens)]
    return GenerationFlops(
        prefill_flops=first.total_flops,
        flops_per_token=sum(steps) / new_tokens,
        new_tokens=new_tokens,
        method=f"{METHOD}: prefill_fn once, then step_fn {new_tokens} times; per token = mean of the steps",
        note=first.note,
    )


def _generate(model: nn.Module, inputs: Any, new_tokens: int, generate_kwargs: Mapping[str, Any]) -> GenerationFlops:
    if not hasattr(model, "generate"):
        raise ValueError(f"{type(model).__name__} has no generate(); pass prefill_fn and step_fn")
    fixed = [key for key in _LENGTH_KWARGS if key in generate_kwargs]
    if fixed:
        raise ValueError(f"generation_flops sets the generation length itself; remove {fixed} from generate_kwargs")
    kwargs = {"do_sample": False, **generate_kwargs}
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs}
    if not isinstance(inputs, Mapping):
        raise ValueError(f"generation_flops needs inputs as a mapping of generate() arguments, got {type(inputs)}")
    outputs: dict[int, torch.Tensor] = {}

    def run(n: int) -> None:
        outputs[n] = _sequences(model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **kwargs))

    prefill = count_flops(lambda: run(1), model=model)
    total = count_flops(lambda: run(new_tokens + 1))
    extra = outputs[new_tokens + 1].shape[-1] - outputs[1].shape[-1]
    if extra != new_tokens:
        raise RuntimeError(
            f"generate() made {extra} more tokens with max_new_tokens={new_tokens + 1} than with 1, expected "
            f"{new_tokens}; a stopping criterion ended generation early"
        )
    return GenerationFlops(
        prefill_flops=prefill.total_flops,
        flops_per_token=(total.total_flops - prefill.total_flops) / new_tokens,
        new_tokens=new_tokens,
        method=(
            f"{METHOD} around model.generate: prefill = max_new_tokens=1; per token = "
            f"(max_new_tokens={new_tokens + 1} - prefill) / {new_tokens}"
        ),
        note=prefill.note,
    )
