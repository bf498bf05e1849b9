"""LoRA recovery finetuning after compression, merged into the weights or kept as an adapter.

A ``lora`` step adds low-rank adapters (Hu et al., "LoRA: Low-Rank Adaptation of Large Language
Models", ICLR 2022, https://arxiv.org/abs/2106.09685) to the selected Linear modules through
peft, trains only the adapters on a dataset split with the finetuning loop of
:mod:`vlmopt.finetune.full` (same tasks, prompts, label masking and schedule), and then either
merges ``W + (alpha / r) B A`` into each weight (``merge: true``, the default: the model keeps its
architecture and size) or keeps the adapters beside the frozen weights (``merge: false``). This
is the recovery step of the RSICD study (seed S3): prune the Q-Former to 6 or 8 layers or OPT to
28, then LoRA with r 16, alpha 32, dropout 0.05 on ``q_proj``, ``k_proj``, ``query`` and ``key``,
lr 5e-4, batch 4, one epoch (here padding is masked in the labels, which that study did not do).

Selection: the usual selectors choose the candidate Linears (``part`` defaults to ``all``);
``targets`` keeps those whose last name component is listed (``[q_proj, k_proj, query, key]``),
and a target that matches no selected module is an error naming it.

Kept adapters are not ordinary weights of the model's class, so an unmerged step must be the last
step of a variant: the compressed folder stores the base weights as usual plus the adapter's
tensors and settings (:func:`save_adapters`), and :func:`restore_adapters` injects and loads them
after the folder is read back. A merged step after a quantizing step would move the weights off
their quantization grid, so it is refused; put recovery before quantization (as the RSICD study
did: prune, LoRA, then quantize).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from vlmopt.compress.select import ModuleRef, NothingSelectedError, Parts, SelectionSpec
from vlmopt.compress.step import StepInputs, StepResult
from vlmopt.data.schema import SPLITS

__all__ = [
    "ADAPTER_DIR",
    "LoRAConfig",
    "TrainingData",
    "apply_lora",
    "has_adapters",
    "restore_adapters",
    "save_adapters",
]

log = logging.getLogger(__name__)

#: Folder, inside a compressed model folder, that holds kept (unmerged) adapters.
ADAPTER_DIR = "lora_adapter"
_ADAPTER = "default"
#: Training settings of a step and their defaults (those of the RSICD study where it set them).
TRAINING_KEYS = {
    "epochs": 1,
    "lr": 5e-4,
    "batch_size": 4,
    "max_steps": None,
    "warmup_steps": 50,
    "weight_decay": 0.0,
    "tasks": None,
    "seed": 0,
    # Steps between checkpoints in the job's work folder (what a killed job resumes from).
    "checkpoint_every": 200,
}


@dataclass
class TrainingData:
    """What a ``lora`` step trains on: the loaded model's processor and adapter, a split table and its
    images, and the training function: ``fit(loaded, table, root, config, checkpoint_dir=,
    fingerprint_extra=)`` with a
    :class:`~vlmopt.finetune.config.FullFinetuneConfig`, returning the run's summary
    (:func:`vlmopt.finetune.full.finetune`; handed in, so that compression never imports the tasks
    training reads its examples through)."""

    loaded: Any
    table: pd.DataFrame
    root: Path
    fit: Callable[..., dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class LoRAConfig(SelectionSpec):
    """Settings of one ``lora`` step: adapter shape, targets, whether to merge, and training data."""

    method = "lora"

    part: str | tuple[str, ...] = "all"
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = ()
    merge: bool = True
    dataset: str
    split: str = "train"
    n: int | None = None
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora: r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or self.alpha <= 0:
            raise ValueError(f"lora: alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ValueError(f"lora: dropout must be a number in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str) or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(
                f"lora: targets must be a list of module names such as [q_proj, k_proj], got {self.targets!r}"
            )
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.merge, bool):
            raise ValueError(f"lora: merge must be true or false, got {self.merge!r}")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError("lora: dataset must name the dataset to train on")
        if self.split not in SPLITS:
            raise ValueError(f"lora: split {self.split!r} is not one of {', '.join(SPLITS)}")
        if self.n is not None and (isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1):
            raise ValueError(f"lora: n must be a positive integer or null (the whole split), got {self.n!r}")
        if not isinstance(self.training, Mapping):
            raise ValueError("lora: training must be a mapping such as {epochs: 1, lr: 5.0e-4, batch_size: 4}")
        unknown = sorted(set(self.training) - set(TRAINING_KEYS))
        if unknown:
            raise ValueError(f"lora: unknown training setting(s) {unknown}; allowed: {sorted(TRAINING_KEYS)}")
        object.__setattr__(self, "training", dict(self.training))
        self.finetune_config()

    def finetune_config(self) -> Any:
        """The :class:`~vlmopt.finetune.config.FullFinetuneConfig` of the training run (validated)."""
        from vlmopt.finetune.config import FullFinetuneConfig

        settings = {**TRAINING_KEYS, **self.training}
        try:
            return FullFinetuneConfig.from_dict(settings)
        except (TypeError, ValueError) as err:
            raise ValueError(f"lora: {err}") from None

    def select(self, model: nn.Module, parts: Parts) -> list[ModuleRef]:
        refs = super().select(model, parts)
        if not self.targets:
            return refs
        last = {ref.name.rpartition(".")[2] for ref in refs}
        missing = [t for t in self.targets if t not in last]
        if missing:
            raise NothingSelectedError(
                f"lora: targets {missing} match no selected Linear module (part={self.part!r}, position="
                f"{self.position!r}, role={self.role!r}); the selected modules end in {sorted(last)}"
            )
        return [ref for ref in refs if ref.name.rpartition(".")[2] in self.targets]

    def peft_settings(self, names: list[str]) -> dict[str, Any]:
        """The peft ``LoraConfig`` keyword arguments for the modules ``names`` (full dotted names)."""
        return {
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": float(self.dropout),
            "target_modules": list(names),
            "bias": "none",
        }


def _peft() -> Any:
    from vlmopt.compress.dynamic_int8 import _quiet_import

    with _quiet_import():
        import peft
    return peft


def _inject(model: nn.Module, settings: Mapping[str, Any]) -> list[str]:
    """Inject LoRA adapters into ``model`` in place; the names of the wrapped modules."""
    peft = _peft()
    config = peft.LoraConfig(**settings)
    peft.inject_adapter_in_model(config, model, adapter_name=_ADAPTER)
    return [name for name, module in model.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _remove_adapters(model: nn.Module, *, merge: bool) -> list[str]:
    """Replace every LoRA layer by its base Linear, merging ``(alpha / r) B A`` into it first if ``merge``."""
    peft = _peft()
    names = [name for name, module in model.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)]
    for name in names:
        layer = model.get_submodule(name)
        if merge:
            layer.merge(safe_merge=True)
        _set_submodule(model, name, layer.get_base_layer())
    return names


def has_adapters(model: nn.Module) -> bool:
    """True if ``model`` holds injected (unmerged) LoRA layers."""
    return any("lora_" in name for name, _ in model.named_parameters())


def apply_lora(model: nn.Module, refs: list[ModuleRef], config: LoRAConfig, inputs: StepInputs) -> StepResult:
    """Train LoRA adapters on the selected modules, then merge or keep them; per-module details and a summary.

    The summary describes the training run (steps, seconds, first and last loss, trainable
    parameters, samples).
    """
    training = inputs.need_training("lora")
    from vlmopt.models.base import LoadedModel

    names = [ref.name for ref in refs]
    before = {ref.name: ref.module.weight.detach().clone() for ref in refs}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    # The adapters' random initialisation (A) comes from the step's seed, so a step is reproducible.
    torch.manual_seed(config.finetune_config().seed)
    wrapped = _inject(model, config.peft_settings(names))
    if sorted(wrapped) != sorted(names):
        raise RuntimeError(f"lora: peft wrapped {sorted(wrapped)}, expected {sorted(names)}")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    table = training.table
    if config.n is not None and config.n < len(table):
        order = torch.randperm(len(table), generator=torch.Generator().manual_seed(config.finetune_config().seed))
        table = table.iloc[sorted(order[: config.n].tolist())].reset_index(drop=True)
    source = training.loaded
    handle = LoadedModel(model, source.processor, source.family, source.adapter, source.source)
    if inputs.work is not None:
        # The job's work folder: a killed job's rerun resumes the training from its last checkpoint.
        summary = training.fit(
            handle,
            table,
            training.root,
            config.finetune_config(),
            checkpoint_dir=inputs.work.folder / "lora",
            fingerprint_extra=inputs.work.inputs,
        )
    else:
        with tempfile.TemporaryDirectory(prefix="vlmopt-lora-") as checkpoints:
            summary = training.fit(handle, table, training.root, config.finetune_config(), checkpoint_dir=checkpoints)
    model.eval()
    if config.merge:
        _remove_adapters(model, merge=True)
    for name, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(name, False))
    details = {}
    for ref in refs:
        weight = model.get_submodule(ref.name).get_parameter("weight") if config.merge else before[ref.name]
        changed = int((weight.detach() != before[ref.name]).sum()) if config.merge else 0
        details[ref.name] = {
            "bits": before[ref.name].dtype.itemsize * 8,
            "r": config.r,
            "alpha": config.alpha,
            "merged": config.merge,
            "elements_changed": changed,
        }
    if config.merge and not any(d["elements_changed"] for d in details.values()):
        raise ValueError("lora: training left every merged weight unchanged (learning rate or steps too small?)")
    losses = [f"{x:.3f}" if x is not None else "n/a" for x in (summary["first_loss"], summary["last_loss"])]
    log.info(
        "lora: %d modules, %d trainable parameters, %d steps (from step %d), loss %s -> %s, %s",
        len(refs),
        trainable,
        summary["steps"],
        summary["resumed_from_step"],
        *losses,
        "merged" if config.merge else "kept as adapter",
    )
    record = {k: v for k, v in summary.items() if k != "config"}
    record.update(trainable_params=trainable, n_samples=len(table), split=config.split)
    return details, record


def _adapter_steps(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        s
        for s in manifest.get("steps", [])
        if s.get("method") == "lora" and not s.get("settings", {}).get("merge", True)
    ]


def save_adapters(model: nn.Module, folder: str | Path) -> Path | None:
    """Write the model's LoRA tensors and settings to ``folder/lora_adapter``, then remove the adapters.

    Returns the adapter folder, or None when the model has none. After this, ``model`` is the base
    model (what ``save_pretrained`` can store); :func:`restore_adapters` puts the adapters back.
    """
    from safetensors.torch import save_file

    if not has_adapters(model):
        return None
    peft = _peft()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    first = next(iter(layers.values()))
    settings = {
        "r": int(first.r[_ADAPTER]),
        "lora_alpha": float(first.lora_alpha[_ADAPTER]),
        "lora_dropout": float(getattr(first.lora_dropout[_ADAPTER], "p", 0.0)),
        "target_modules": sorted(layers),
        "bias": "none",
    }
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if "lora_" in k}
    out = Path(folder) / ADAPTER_DIR
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter.safetensors")
    (out / "adapter.json").write_text(json.dumps(settings, indent=2))
    _remove_adapters(model, merge=False)
    return out


def restore_adapters(model: nn.Module, manifest: Mapping[str, Any], folder: str | Path) -> list[str]:
    """Inject and load the kept LoRA adapters of a compressed folder; the wrapped module names.

    Raises ``ValueError`` if the manifest records an unmerged ``lora`` step but the folder holds no
    adapter, or the adapter's tensors do not match the injected layers.
    """
    from safetensors.torch import load_file

    if not _adapter_steps(manifest):
        return []
    adapter = Path(folder) / ADAPTER_DIR
    if not (adapter / "adapter.json").is_file():
        raise ValueError(f"lora: the manifest records a kept adapter but {adapter} holds none")
    settings = json.loads((adapter / "adapter.json").read_text())
    wrapped = _inject(model, settings)
    tensors = load_file(adapter / "adapter.safetensors")
    expected = {k for k in model.state_dict() if "lora_" in k}
    if set(tensors) != expected:
        raise ValueError(
            f"lora: {adapter} does not match the injected layers: missing {sorted(expected - set(tensors))[:5]}, "
            f"extra {sorted(set(tensors) - expected)[:5]}"
        )
    model.load_state_dict(tensors, strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    log.info("lora: restored the adapter on %d modules from %s", len(wrapped), adapter)
    return wrapped
