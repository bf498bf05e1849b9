"""Low-rank factorization of Linear weights by truncated SVD (real, not simulated).

Each selected ``nn.Linear`` with weight ``W`` (``m`` outputs x ``n`` inputs) is replaced by a
:class:`LowRankLinear`: a Linear ``n -> r`` without bias (``down``) followed by a Linear ``r -> m``
that keeps the original bias (``up``). With the SVD ``W = U S V^T`` and the ``r`` largest singular
values kept, ``up.weight = U_r sqrt(S_r)`` and ``down.weight = sqrt(S_r) V_r^T``, so the pair
computes ``W_r = U_r S_r V_r^T``, the best rank-``r`` approximation of ``W`` in Frobenius norm
(Eckart-Young): ``||W - W_r||_F^2`` is the sum of the discarded ``s_i^2``. The weight's
parameters fall from ``m n`` to ``r (m + n)`` and so do the multiply-adds per token; the factors
are what gets saved, so the model folder gets smaller too (the CLIP study multiplied the factors
back into a dense matrix, which saved nothing).

The rank is given directly (``rank``) or from ``ratio`` as in the CLIP low-rank study:
``rank = int(ratio * m * n / (m + n))``, so ``ratio`` is about the fraction of the weight's
parameters kept. (That study used ``m + n + 1`` in the denominator because it stored ``S``
separately; here ``sqrt(S)`` is folded into both factors, so ``r (m + n)`` is the whole cost.) A
rank that would not reduce the parameter count, or a rank below 1, is an error naming the module.

``from_pretrained`` rebuilds the original dense architecture, so a saved factorized model is
reloaded in two steps: load the folder as usual, then :func:`restore_structure` replaces the
factorized modules (names and ranks come from the manifest) and loads their factors from the
folder's safetensors.

Method: Denton et al., "Exploiting Linear Structure Within Convolutional Networks for Efficient
Evaluation", NeurIPS 2014, https://arxiv.org/abs/1404.0736; Eckart and Young, "The approximation
of one matrix by another of lower rank", Psychometrika 1936.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmopt.compress.prune_layers import final_name
from vlmopt.compress.select import ModuleRef, SelectionSpec
from vlmopt.compress.step import StepInputs, StepResult

__all__ = [
    "LowRankLinear",
    "SVDConfig",
    "apply_svd",
    "factorize_linear",
    "rank_from_ratio",
    "restore_structure",
    "svd_modules",
]

log = logging.getLogger(__name__)

METHOD = "svd"


@dataclass(frozen=True, kw_only=True)
class SVDConfig(SelectionSpec):
    """Settings of one ``svd`` step: exactly one of ``ratio`` (0 < ratio < 1) or ``rank``, and the selection."""

    method = METHOD

    ratio: float | None = None
    rank: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.ratio is None) == (self.rank is None):
            raise ValueError(
                f"svd: give exactly one of ratio (fraction of each weight's parameters kept) or rank, "
                f"got ratio={self.ratio!r}, rank={self.rank!r}"
            )
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float) or not 0 < self.ratio < 1:
                raise ValueError(f"svd: ratio must be a number with 0 < ratio < 1, got {self.ratio!r}")
            object.__setattr__(self, "ratio", float(self.ratio))
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"svd: rank must be a positive integer, got {self.rank!r}")

    def rank_for(self, out_features: int, in_features: int) -> int:
        """The rank for a weight of ``out_features`` x ``in_features`` (not yet checked)."""
        if self.rank is not None:
            return self.rank
        assert self.ratio is not None
        return rank_from_ratio(self.ratio, out_features, in_features)


def rank_from_ratio(ratio: float, m: int, n: int) -> int:
    """``int(ratio * m * n / (m + n))``: the rank whose factors hold about ``ratio`` of the ``m x n`` weight."""
    return int(ratio * m * n / (m + n))


class LowRankLinear(nn.Module):
    """``up(down(x))``: a rank-``rank`` stand-in for an ``in_features -> out_features`` Linear."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def weight(self) -> torch.Tensor:
        """The output-side factor ``up.weight`` (out_features x rank), not the dense weight.

        Exposed for model code that reads a Linear's ``weight.dtype`` or ``weight.device``: T5's
        and Pix2Struct's gated MLPs cast their input to ``wo.weight.dtype``. The dense weight this
        layer stands for is ``up.weight @ down.weight``.
        """
        return self.up.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _check_rank(name: str, rank: int, m: int, n: int) -> None:
    if rank < 1:
        raise ValueError(f"svd: rank {rank} for {name} ({m}x{n}) is below 1; raise ratio or rank")
    if rank * (m + n) >= m * n:
        raise ValueError(
            f"svd: rank {rank} for {name} ({m}x{n}) would not reduce its parameters "
            f"({rank}*({m}+{n}) = {rank * (m + n)} >= {m * n}); the largest rank that does is {(m * n - 1) // (m + n)}"
        )


@torch.no_grad()
def factorize_linear(linear: nn.Linear, rank: int, *, name: str = "module") -> tuple[LowRankLinear, torch.Tensor]:
    """The rank-``rank`` factorization of ``linear`` and all singular values of its weight (descending)."""
    m, n = linear.out_features, linear.in_features
    _check_rank(name, rank, m, n)
    weight = linear.weight.detach()
    on_cpu = weight.device.type == "cpu"
    with _threads(1 if on_cpu and weight.numel() < _SMALL else None):
        u, s, vh = torch.linalg.svd(weight.to(torch.float64 if on_cpu else torch.float32), full_matrices=False)
    root = s[:rank].sqrt()
    low = LowRankLinear(n, m, rank, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    low.up.weight.copy_(u[:, :rank] * root)
    low.down.weight.copy_(root[:, None] * vh[:rank])
    if linear.bias is not None:
        low.up.bias.copy_(linear.bias.detach())
    low.train(linear.training)
    return low, s


#: Below this many elements a CPU SVD runs on one thread: the threaded LAPACK call spends far longer
#: synchronizing than computing (measured 0.18 s on two threads vs 0.6 ms on one for 96 x 48).
_SMALL = 1 << 18


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_svd(model: nn.Module, refs: list[ModuleRef], config: SVDConfig, inputs: StepInputs) -> StepResult:
    """Factorize every module of ``refs`` in place; per-module details and a step summary.

    Every rank is checked before any module changes, so a bad setting leaves the model intact.
    Per module: the rank, the shapes, the parameter counts before and after (bias included) and
    the fraction of the weight's squared Frobenius norm (singular value energy) kept.
    """
    plans = []
    for ref in refs:
        linear = ref.module
        rank = config.rank_for(linear.out_features, linear.in_features)
        _check_rank(ref.name, rank, linear.out_features, linear.in_features)
        plans.append((ref, rank))
    details: dict[str, dict[str, Any]] = {}
    for ref, rank in plans:
        linear = ref.module
        low, s = factorize_linear(linear, rank, name=ref.name)
        energy = s.square()
        bias = linear.bias.numel() if linear.bias is not None else 0
        m, n = linear.out_features, linear.in_features
        details[ref.name] = {
            "bits": linear.weight.dtype.itemsize * 8,
            "rank": rank,
            "out_features": m,
            "in_features": n,
            "bias": linear.bias is not None,
            "params_before": m * n + bias,
            "params_after": rank * (m + n) + bias,
            "energy_kept": float(energy[:rank].sum() / energy.sum()) if float(energy.sum()) > 0 else 1.0,
        }
        _set_submodule(model, ref.name, low)
    before = sum(d["params_before"] for d in details.values())
    after = sum(d["params_after"] for d in details.values())
    log.info("svd: %d modules factorized, their parameters %d -> %d", len(details), before, after)
    summary = {"factorized": len(details), "module_params_before": before, "module_params_after": after}
    return details, summary


def svd_modules(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The factorized modules recorded in ``manifest`` (rank, shapes, bias) under their final names.

    A module in a layer that a later ``prune_layers`` step renumbered gets its new name; one in a
    layer it dropped is left out.
    """
    steps = list(manifest.get("steps", []))
    records = []
    for index, step in enumerate(steps):
        if step.get("method") != METHOD or not step.get("applied", True):
            continue
        for module in step["modules"]:
            name = final_name(module["name"], steps[index + 1 :])
            if name is not None:
                keys = ("rank", "out_features", "in_features", "bias")
                records.append({"name": name, **{k: module[k] for k in keys}})
    return records


def _read_tensors(folder: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors of the folder's safetensors whose names start with one of ``prefixes``."""
    from safetensors import safe_open

    from vlmopt.compress.sharing import weight_files

    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(folder, "cannot restore the SVD factors"):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(prefixes):
                    tensors[key] = handle.get_tensor(key)
    return tensors


def saved_key_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """The name under which ``save_pretrained`` stored each of the model's state-dict ``keys``.

    transformers 5 writes some models (LLaVA, Fuyu, Qwen2.5-VL) under their older checkpoint key
    names (``language_model.model.layers...`` for ``model.language_model.layers...``) and renames
    them back on load; tensors read straight from the files must be looked up under the saved
    name. The renaming is transformers' own (``revert_weight_conversion``), applied to placeholders
    whose identity maps each saved name back to its key.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without checkpoint conversions saves names as they are
        return {key: key for key in keys}
    placeholders = {key: torch.empty(0) for key in keys}
    by_id = {id(t): key for key, t in placeholders.items()}
    renamed = revert_weight_conversion(model, dict(placeholders))
    out = {by_id[id(t)]: saved for saved, t in renamed.items() if id(t) in by_id}
    return {key: out.get(key, key) for key in keys}


@torch.no_grad()
def restore_structure(model: nn.Module, manifest: Mapping[str, Any], folder: str | os.PathLike[str]) -> list[str]:
    """Rebuild the SVD factorizations the manifest records on a freshly loaded model; their names.

    ``model`` comes from ``from_pretrained`` on ``folder``, which knows only the dense
    architecture: the factorized Linear modules are back as dense (freshly initialized) Linears.
    Each is replaced by a :class:`LowRankLinear` of the recorded rank (same dtype and device), and
    the factors are loaded from the folder's safetensors. Layer pruning needs nothing here (the
    saved config already has the pruned layer counts). Call it before re-applying runtime steps.
    Raises ``ValueError`` if a recorded module is missing, has another shape, or a factor is
    missing from the folder.
    """
    records = svd_modules(manifest)
    if not records:
        return []
    folder = Path(folder)
    new_modules: dict[str, LowRankLinear] = {}
    for record in records:
        name = record["name"]
        try:
            current = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"svd: the manifest factorized {name}, which the loaded model does not have") from err
        if not isinstance(current, nn.Linear):
            raise ValueError(f"svd: {name} is a {type(current).__name__} in the loaded model, expected a dense Linear")
        m, n = record["out_features"], record["in_features"]
        if (current.out_features, current.in_features) != (m, n):
            raise ValueError(
                f"svd: {name} is {current.out_features}x{current.in_features} in the loaded model, "
                f"the manifest recorded {m}x{n}"
            )
        new_modules[name] = LowRankLinear(
            n,
            m,
            record["rank"],
            bias=record["bias"],
            device=current.weight.device,
            dtype=current.weight.dtype,
        )
    saved = saved_key_names(model, [f"{name}.{key}" for name, low in new_modules.items() for key in low.state_dict()])
    tensors = _read_tensors(folder, tuple(saved.values()))
    for name, low in new_modules.items():
        state = {key: tensors.get(saved[f"{name}.{key}"]) for key in low.state_dict()}
        missing = [f"{name}.{key}" for key, value in state.items() if value is None]
        if missing:
            raise ValueError(f"svd: {folder} lacks the factors {missing} recorded in the manifest")
        low.load_state_dict(state, strict=True)
        current = model.get_submodule(name)
        low.train(current.training)
        _set_submodule(model, name, low)
    expected = manifest.get("parameters", {}).get("model", {}).get("total")
    found = sum(p.numel() for p in model.parameters())
    if expected is not None and found != expected:
        log.warning("svd: the restored model has %d parameters, the manifest recorded %d", found, expected)
    log.info("svd: restored %d factorized modules from %s", len(new_modules), folder)
    return list(new_modules)
