"""Apply a variant (an ordered list of compression steps) and describe what it changed.

:data:`~vlmopt.compress.methods.METHODS` maps a method name to its config class and handler, so
adding a method is one module plus one entry there. Every step selects its modules through
:meth:`~vlmopt.compress.select.SelectionSpec.select` (one walker for all methods), then the
handler changes them and reports per-module details. Steps that hold weights in a form the saved
model cannot store (``runtime`` methods such as ``dynamic_int8``) must come last; they are
listed in the manifest's ``runtime_steps`` and re-applied after loading with
:func:`apply_runtime_steps`.

``structural`` methods (``svd``, ``prune_layers``) change the model's structure rather than its
weight values; their handlers return a step summary, the step entry
records the model's parameter count before and after, later steps see the layers as they are
after the change, and the manifest's parameter totals and nominal size count the parameters as
they are at the end (removed parameters count zero).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from vlmopt.compress.calibration import Calibration
from vlmopt.compress.lora import TrainingData
from vlmopt.compress.manifest import ParamInfo, build_manifest, param_inventory
from vlmopt.compress.methods import METHODS, RUNTIME_METHODS, Method
from vlmopt.compress.prune_layers import final_name, refresh_parts
from vlmopt.compress.select import ModuleRef, Parts, SelectionSpec, check_parts
from vlmopt.compress.step import StepInputs, StepWork

__all__ = [
    "METHODS",
    "RUNTIME_METHODS",
    "Method",
    "apply_runtime_steps",
    "apply_variant",
    "check_step_order",
    "check_weights",
    "parse_step",
    "step_datasets",
    "step_tasks",
]

log = logging.getLogger(__name__)


def parse_step(step: Mapping[str, Any]) -> tuple[Method, SelectionSpec]:
    """The method and validated config of one step dict such as ``{"method": "uniform", "bits": 4, ...}``."""
    if not isinstance(step, Mapping):
        raise ValueError(f"a step must be a mapping with a 'method' key, got {step!r}")
    if "method" not in step:
        raise ValueError(f"step {dict(step)} has no 'method'; methods: {', '.join(METHODS)}")
    name = step["method"]
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    method = METHODS[name]
    return method, method.config.from_dict({k: v for k, v in step.items() if k != "method"})


def step_datasets(step: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(dataset, split)`` pairs a step reads: its calibration split, or the split it trains on."""
    method, config = parse_step(step)
    if method.calibrated and config.calibration:
        return [(config.calibration["dataset"], config.calibration["split"])]
    if method.trained:
        return [(config.dataset, config.split)]
    return []


def step_tasks(step: Mapping[str, Any]) -> tuple[str, ...]:
    """The task names a trained step's training reads its examples through (none for other steps)."""
    method, config = parse_step(step)
    return tuple(config.finetune_config().tasks or ()) if method.trained else ()


def check_weights(model: nn.Module, refs: list[ModuleRef], method: str) -> None:
    """Reject weights that are already quantized, or shared with a module outside the selection."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    selected = {f"{ref.name}.weight" for ref in refs}
    for ref in refs:
        weight = ref.module.weight
        if type(weight.data) is not torch.Tensor or not weight.is_floating_point():
            raise ValueError(
                f"{method}: {ref.name} already holds a {type(weight.data).__name__} weight; "
                "runtime steps (such as dynamic_int8) must come last in a variant"
            )
        shared = [n for n in owners.get(id(weight), []) if n not in selected]
        if shared:
            raise ValueError(
                f"{method}: the weight of {ref.name} is shared with {shared}, which the step does not "
                "select; changing it would change those too"
            )


def _run_step(
    model: nn.Module,
    parts: Parts,
    method: Method,
    config: SelectionSpec,
    *,
    apply: bool,
    refs: list[ModuleRef] | None = None,
    calibration: Calibration | None = None,
    training: TrainingData | None = None,
    work: StepWork | None = None,
) -> dict[str, Any]:
    if refs is None:
        refs = config.select(model, parts)
    check_weights(model, refs, config.method)
    structure = None
    if not apply:
        details = {}
    else:
        params_before = _count_params(model) if method.structural else None
        inputs = StepInputs(parts, calibration=calibration, training=training, work=work)
        details, summary = method.handler(model, refs, config, inputs)
        if method.structural:
            structure = {**summary, "params_before": params_before, "params_after": _count_params(model)}
    bits = method.bits(config)
    modules = [{**ref.record(), "bits": bits, **details.get(ref.name, {})} for ref in refs]
    entry = {
        "method": config.method,
        "settings": config.to_dict(),
        "simulated": method.simulated,
        "runtime": method.runtime,
        "applied": apply,
        "n_modules": len(refs),
        "modules": modules,
        "backend": method.backend(),
    }
    if structure is not None:
        entry["structure"] = structure
    if calibration is not None:
        entry["calibration"] = {**calibration.description, "settings": getattr(config, "calibration", None)}
    log.info("%s: %d modules in %s", config.method, len(refs), sorted({r.part for r in refs}))
    return entry


def apply_variant(
    model: nn.Module,
    parts: Parts,
    steps: list[Mapping[str, Any]],
    *,
    defer_runtime: bool = False,
    calibration: Calibration | Callable[[dict[str, Any]], Calibration] | None = None,
    training: Callable[[dict[str, Any]], TrainingData] | None = None,
    work: StepWork | None = None,
) -> dict[str, Any]:
    """Apply ``steps`` to ``model`` in place, in order, and return the manifest dict.

    An empty list is the baseline (nothing changes). Every step's settings are validated before
    any step runs; an error raised while a step runs (an empty selection, a step that changed
    nothing) leaves the model partly changed, so discard it. With ``defer_runtime=True`` the
    runtime steps are selected and recorded but not applied, so the caller can save the float
    weights first and then call :func:`apply_runtime_steps`.

    ``calibration`` serves the calibrated methods (GPTQ, AWQ): a :class:`Calibration`, or a
    function from a step's calibration settings (``{dataset, split, n, batch_size, seed}``) to one.
    ``training`` serves the trained methods (LoRA): a function from ``{dataset, split}`` to the
    :class:`~vlmopt.compress.lora.TrainingData` of that split.

    ``work`` is where long steps (LoRA training, GPTQ, AWQ) keep their progress so that a killed
    job resumes: step ``i`` gets ``work.folder / f"step-{i}"`` and ``work.inputs`` plus the steps up
    to and including its own as the fingerprint of what it keeps there.
    """
    if isinstance(steps, Mapping) or isinstance(steps, str):
        raise ValueError("steps must be a list of step mappings")
    parsed = []
    for index, step in enumerate(steps):
        try:
            parsed.append(parse_step(step))
        except ValueError as err:
            raise ValueError(f"step {index}: {err}") from None
    check_step_order(parsed)
    if training is None:
        needy = [i for i, (method, _) in enumerate(parsed) if method.trained]
        if needy:
            raise ValueError(f"step {needy[0]}: {parsed[needy[0]][1].method} trains on a dataset, and none was given")
    if calibration is None:
        needy = [i for i, (method, _) in enumerate(parsed) if method.calibrated]
        if needy:
            raise ValueError(
                f"step {needy[0]}: {parsed[needy[0]][1].method} needs calibration data, and none was given"
            )
    check_parts(model, parts)
    inventory = param_inventory(model, parts)
    entries = []
    for index, (method, config) in enumerate(parsed):
        apply = not (method.runtime and defer_runtime)
        data = None
        if method.calibrated and apply:
            if isinstance(calibration, Calibration):
                data = calibration
            elif not config.calibration:
                raise ValueError(
                    f"step {index}: {config.method} needs calibration settings such as "
                    "calibration: {dataset: shapes, split: train, n: 128}"
                )
            else:
                data = calibration(dict(config.calibration))
        train = training({"dataset": config.dataset, "split": config.split}) if method.trained and apply else None
        step_work = None
        if work is not None:
            step_work = StepWork(
                work.folder / f"step-{index}", {**work.inputs, "steps": [dict(s) for s in steps[: index + 1]]}
            )
        try:
            entries.append(
                _run_step(model, parts, method, config, apply=apply, calibration=data, training=train, work=step_work)
            )
        except ValueError as err:
            raise type(err)(f"step {index}: {err}") from None
        if method.structural and apply:
            parts = refresh_parts(model, parts)
    runtime_steps = [config.to_dict() for method, config in parsed if method.runtime]
    if any(method.structural for method, _ in parsed):
        return _structural_manifest(model, parts, entries, runtime_steps)
    return build_manifest(inventory, parts, entries, runtime_steps)


def check_step_order(parsed: list[tuple[Method, SelectionSpec]]) -> None:
    """Refuse step orders that cannot run or would silently undo or hide earlier steps.

    ``parsed`` is the variant's steps as :func:`parse_step` returns them. Needs no model: the
    study check calls it before any job runs, and :func:`apply_variant` again before any step.
    """
    seen_runtime = None
    for index, (method, config) in enumerate(parsed):
        if method.runtime:
            seen_runtime = config.method
        elif seen_runtime is not None:
            raise ValueError(
                f"step {index}: {config.method} comes after the runtime step {seen_runtime}; "
                "runtime steps must come last"
            )
    for index, (method, config) in enumerate(parsed):
        if not method.trained:
            continue
        quantized = [c.method for m, c in parsed[:index] if m.simulated]
        if getattr(config, "merge", True) and quantized:
            raise ValueError(
                f"step {index}: a merged {config.method} step after {quantized[0]} would move the quantized "
                "weights off their grid; recover before quantizing (prune, lora, then quantize) or keep the "
                "adapter (merge: false)"
            )
        if not getattr(config, "merge", True) and index != len(parsed) - 1:
            raise ValueError(
                f"step {index}: {config.method} with merge: false keeps adapters beside the weights and must be the "
                "last step of a variant"
            )


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


#: Name prefix, in the accounting only, of modules that a later step removed.
_REMOVED = "<removed>"


def _inner_linears(model: nn.Module, name: str) -> list[str]:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return []
    return [f"{name}.{local}" for local, m in module.named_modules() if local and isinstance(m, nn.Linear)]


def _structural_manifest(
    model: nn.Module, parts: Parts, entries: list[dict[str, Any]], runtime_steps: list[dict[str, Any]]
) -> dict[str, Any]:
    """The manifest of a variant with structural steps, counting the parameters as they are at the end.

    Step entries keep the module names as they were when each step ran. For the accounting, each
    recorded module is followed to its final name (layers renamed by a later ``prune_layers``);
    dropped modules count zero elements and a factorized module (``svd``) counts as the Linear
    modules that now hold its weight, so totals, nominal size and ``changed_modules`` describe the
    final model.
    """
    inventory = param_inventory(model, parts)
    accounting = []
    for index, entry in enumerate(entries):
        records = []
        for record in entry["modules"]:
            name = final_name(record["name"], entries[index:])
            if name is None:
                name = f"{_REMOVED}{index}:{record['name']}"
            weight = f"{name}.weight"
            if weight not in inventory:
                # A factorized module: its weights now live in the Linear modules inside it.
                inner = _inner_linears(model, name)
                if inner:
                    records.extend({**record, "name": inner_name} for inner_name in inner)
                    continue
                inventory[weight] = ParamInfo(numel=0, dtype_bits=int(record["bits"]), part=record["part"])
            records.append({**record, "name": name})
        accounting.append({**entry, "modules": records})
    manifest = build_manifest(inventory, parts, accounting, runtime_steps)
    changed = [m for m in manifest["changed_modules"] if not m["name"].startswith(_REMOVED)]
    return {**manifest, "steps": entries, "changed_modules": changed, "n_changed_modules": len(changed)}


def apply_runtime_steps(model: nn.Module, parts: Parts, manifest: Mapping[str, Any]) -> list[list[str]]:
    """Re-apply the manifest's ``runtime_steps`` to a freshly loaded float model, in order.

    Checks, before changing anything, that each step selects exactly the modules the manifest
    recorded for it; returns the module names per step.
    """
    runtime_steps = list(manifest.get("runtime_steps", []))
    recorded = [s for s in manifest.get("steps", []) if s.get("runtime")]
    if recorded and len(recorded) != len(runtime_steps):
        raise ValueError(f"manifest lists {len(runtime_steps)} runtime steps but {len(recorded)} runtime step records")
    check_parts(model, parts)
    planned = []
    for index, step in enumerate(runtime_steps):
        method, config = parse_step(step)
        if not method.runtime:
            raise ValueError(f"runtime step {index}: {config.method} is not a runtime method")
        refs = config.select(model, parts)
        names = [ref.name for ref in refs]
        if recorded:
            expected = [m["name"] for m in recorded[index]["modules"]]
            if names != expected:
                missing = sorted(set(expected) - set(names))
                extra = sorted(set(names) - set(expected))
                raise ValueError(
                    f"runtime step {index} ({config.method}) selected different modules than the manifest "
                    f"records: missing {missing}, extra {extra}"
                )
        planned.append((method, config, refs))
    for method, config, refs in planned:
        _run_step(model, parts, method, config, apply=True, refs=refs)
    return [[ref.name for ref in refs] for _, _, refs in planned]
