"""Progress of a layer-by-layer step (GPTQ, AWQ) kept in its work folder, so that a killed job resumes.

The calibrated walk (:func:`vlmopt.compress.calibration._run_layers`) quantizes one layer at a
time and captures each layer's calibration inputs by running the model from its start, through
the layers already quantized. The state of the walk after ``k`` layers is therefore the model's
parameters that those layers changed, plus what was recorded about them; nothing else (no
activations) carries over from one layer to the next. After each layer the walk writes a
checkpoint (:mod:`vlmopt.checkpoints`) to ``<work folder>/layers``::

    state.json              step = layers done, and the fingerprint of the run's inputs
    progress.json           {"layers": [finished layer names], "details": {...}, "state": {...}}
    layer-0000.safetensors  the parameters layer 0 changed, by full name, as they now are
    layer-0001.safetensors  ...

Only the changed parameters are kept (the selected Linears' weights, and for AWQ the norms and
Linears that absorbed scales), one file per layer; a new checkpoint hard-links the earlier
layers' files rather than copying them, so each layer's tensors are written once.

A rerun resumes only a checkpoint of the same inputs: the step's
:class:`~vlmopt.compress.step.StepWork` inputs, the method, the layer list, the model's device
type and dtype, and a digest of its weights as the step receives them (which tells apart earlier
steps whose rerun did not give the same model). It copies the saved parameters back into the
model, takes the details and the method's running ``state`` as they were, and continues with the
next layer: that layer's calibration inputs are those an uninterrupted run computes, since the
layers before it hold bit for bit the same weights. A checkpoint of other inputs is set aside,
never resumed; one that is damaged (a file missing or not matching the model) is set aside too,
before anything is copied into the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vlmopt.checkpoints import read_state, resumable_step, set_aside, write_checkpoint
from vlmopt.compress.packed import GridRecord, grid_of, mark_off_grid, off_grid, record_grid
from vlmopt.compress.step import StepWork

__all__ = ["LayerProgress"]

log = logging.getLogger(__name__)

PROGRESS = "progress.json"


def _layer_file(index: int) -> str:
    return f"layer-{index:04d}.safetensors"


class LayerProgress:
    """The checkpoint of one layer-by-layer step of ``method`` over the layers ``labels``.

    :meth:`resume` restores a matching checkpoint into the model; :meth:`save` records each
    finished layer.
    """

    def __init__(self, work: StepWork, method: str, labels: list[str], model: nn.Module) -> None:
        param = next(model.parameters())
        self.method = method
        self.labels = list(labels)
        self.directory = Path(work.folder) / "layers"
        walk = {
            "method": method,
            "layers": self.labels,
            "device": param.device.type,
            "dtype": str(param.dtype),
            "weights": _weights_digest(model),
        }
        self.inputs = {**work.inputs, "layer_walk": walk}

    def resume(self, model: nn.Module, details: dict[str, dict[str, Any]], state: dict[str, Any]) -> int:
        """Restore a checkpoint of these inputs into ``model``, ``details`` and ``state``; the layers done.

        0 when there is nothing to resume (no checkpoint, or one set aside).
        """
        total = len(self.labels)
        done = resumable_step(self.directory, self.inputs, total) or 0
        if not done:
            return 0
        try:
            progress = json.loads((self.directory / PROGRESS).read_text())
            if progress["layers"] != self.labels[:done]:
                raise ValueError(f"it lists layers {progress['layers']}, not the first {done} of this run")
            if not isinstance(progress["details"], dict) or not isinstance(progress["state"], dict):
                raise ValueError(f"its {PROGRESS} holds no details or state")
            files = [self.directory / _layer_file(i) for i in range(done)]
            params = dict(model.named_parameters(remove_duplicate=False))
            for path in files:
                _check_file(params, path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            moved = set_aside(self.directory, read_state(self.directory))
            log.warning(
                "%s: not resuming from %s: %s; set it aside as %s and starting from the first layer",
                self.method,
                self.directory,
                err,
                moved,
            )
            return 0
        with torch.no_grad():
            for path in files:
                tensors = load_file(path)
                for name, tensor in tensors.items():
                    if not name.startswith(_GRID):
                        model.get_parameter(name).copy_(tensor)
                for module, record in _grids(tensors).items():
                    if isinstance(record, str):
                        mark_off_grid(model.get_submodule(module), record)
                    else:
                        record_grid(model.get_submodule(module), record)
        details.update(progress["details"])
        state.update(progress["state"])
        log.info(
            "%s: resuming after layer %d of %d (%s) from %s",
            self.method,
            done,
            total,
            self.labels[done - 1],
            self.directory,
        )
        return done

    def save(
        self,
        done: int,
        params: dict[str, torch.Tensor],
        details: dict[str, dict[str, Any]],
        state: dict[str, Any],
        grids: dict[str, GridRecord | str] | None = None,
    ) -> None:
        """Record that the first ``done`` layers are finished; ``params`` are those the last one changed,
        ``grids`` the integer grids its quantizer recorded (:mod:`vlmopt.compress.packed`)."""
        tensors = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in params.items()}
        tensors.update(_grid_tensors(grids or {}))
        progress = {"layers": self.labels[:done], "details": details, "state": state}

        def write(folder: Path) -> None:
            for index in range(done - 1):
                name = _layer_file(index)
                try:
                    os.link(self.directory / name, folder / name)
                except OSError:
                    shutil.copyfile(self.directory / name, folder / name)
            save_file(tensors, folder / _layer_file(done - 1))
            (folder / PROGRESS).write_text(json.dumps(progress))

        write_checkpoint(self.directory, done, self.inputs, write)


#: Key prefix of the grid tensors in a layer file: ``grid/<module>/<field>``, the scheme in
#: ``grid/<module>/scheme`` as int64 ``[bits, symmetric, strategy index, group size or 0]``.
_GRID = "grid/"
_STRATEGIES = ("group", "channel", "tensor")


def _grid_tensors(grids: dict[str, GridRecord | str]) -> dict[str, torch.Tensor]:
    out = {}
    for module, r in grids.items():
        if isinstance(r, str):  # on no grid, and why
            out[f"{_GRID}{module}/off"] = torch.tensor(list(r.encode()), dtype=torch.uint8)
            continue
        scheme = [r.bits, int(r.symmetric), _STRATEGIES.index(r.strategy), r.group_size or 0]
        out[f"{_GRID}{module}/scheme"] = torch.tensor(scheme, dtype=torch.int64)
        out[f"{_GRID}{module}/scale"] = r.scale.detach().to("cpu", copy=True).contiguous()
        out[f"{_GRID}{module}/zero_point"] = r.zero_point.detach().to("cpu", copy=True).contiguous()
        if r.g_idx is not None:
            out[f"{_GRID}{module}/g_idx"] = r.g_idx.detach().to("cpu", copy=True).contiguous()
    return out


def _grids(tensors: dict[str, torch.Tensor]) -> dict[str, GridRecord | str]:
    modules = {key[len(_GRID) :].rpartition("/")[0] for key in tensors if key.startswith(_GRID)}
    out = {}
    for module in modules:
        if f"{_GRID}{module}/off" in tensors:
            out[module] = bytes(tensors[f"{_GRID}{module}/off"].tolist()).decode()
            continue
        bits, symmetric, strategy, group_size = tensors[f"{_GRID}{module}/scheme"].tolist()
        out[module] = GridRecord(
            bits=bits,
            symmetric=bool(symmetric),
            strategy=_STRATEGIES[strategy],
            group_size=group_size or None,
            scale=tensors[f"{_GRID}{module}/scale"],
            zero_point=tensors[f"{_GRID}{module}/zero_point"],
            g_idx=tensors.get(f"{_GRID}{module}/g_idx"),
        )
    return out


def layer_grids(group: list[Any]) -> dict[str, GridRecord | str]:
    """The grids the quantizer recorded on a layer's modules (refs with ``name`` and ``module``), or
    why a module is on none (:func:`vlmopt.compress.packed.mark_off_grid`)."""
    out: dict[str, GridRecord | str] = {}
    for ref in group:
        record = grid_of(ref.module) or off_grid(ref.module)
        if record is not None:
            out[ref.name] = record
    return out


def _weights_digest(model: nn.Module) -> str:
    """Digest of the model as the step receives it: each parameter's name, shape, dtype and first and
    last 64 values (cheap on any size; earlier steps that change weights change nearly every tensor)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        sample = torch.cat([flat[:64], flat[-64:]]).cpu().contiguous()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_file(params: dict[str, nn.Parameter], path: Path) -> None:
    """ValueError unless every tensor in ``path`` is one of ``params`` (by name) with the same shape."""
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path.name} is not a readable safetensors file ({err})") from None
    for name, shape in shapes.items():
        if name.startswith(_GRID):
            continue
        p = params.get(name)
        if p is None:
            raise ValueError(f"{path.name} holds {name}, which the model has no parameter of")
        if shape != tuple(p.shape):
            raise ValueError(f"{path.name}: {name} is shaped {shape}, the model's {tuple(p.shape)}")
