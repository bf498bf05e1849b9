"""Calibration data for data-aware methods (GPTQ, AWQ) and layer-by-layer input capture.

:class:`Calibration` holds ready model inputs built from real multimodal samples of a split
(images and the task prompts with their targets), so the vision encoder is calibrated on images
and the language model on the token sequences it sees when it answers.

:func:`capture_layer_inputs` runs the model on the calibration batches and hands the inputs of
the selected Linear modules of one layer to a callback, stopping each forward pass as soon as that
layer has run. Called layer after layer, in pipeline order, with each layer quantized before the
next is captured, every layer is calibrated on the outputs of the already-quantized layers before
it, as GPTQ prescribes (Frantar et al. 2022, https://arxiv.org/abs/2210.17323, section 4).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from vlmopt.compress.select import ModuleRef, Parts

__all__ = ["Calibration", "capture_layer_inputs", "layer_groups"]

log = logging.getLogger(__name__)


class _LayerDone(Exception):
    """Raised by a hook to stop a forward pass once the layer under calibration has run."""


@dataclass
class Calibration:
    """Model-ready calibration batches (each a dict of tensors for ``model(**batch)``)."""

    batches: list[dict[str, torch.Tensor]]
    #: Where the samples came from, for the manifest.
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)

    @classmethod
    def from_table(
        cls,
        loaded: Any,
        table: pd.DataFrame,
        dataset_root: str | Path,
        *,
        n_samples: int = 128,
        batch_size: int = 8,
        tasks: tuple[str, ...] | None = None,
        seed: int = 0,
    ) -> Calibration:
        """``n_samples`` rows drawn (seeded) from ``table``, batches encoded for each task in turn.

        ``tasks`` defaults to every task the family runs. Captioning examples pair the image with
        the task prompt and a reference caption; VQA examples with the question prompt and the most
        common answer, as in finetuning; retrieval and classification examples with a caption or
        the class prompt.
        """
        from vlmopt.data.images import open_image
        from vlmopt.tasks import get_task, served_tasks

        if n_samples < 1 or batch_size < 1:
            raise ValueError(f"calibration needs n_samples >= 1 and batch_size >= 1, got {n_samples}, {batch_size}")
        wanted = loaded.adapter.tasks if tasks is None else tasks
        requested = tasks is not None
        tasks = tuple(t for t in wanted if t in loaded.adapter.tasks)
        if not tasks:
            raise ValueError(f"family {loaded.family!r} supports none of the calibration tasks {list(wanted)}")
        # A table serves the tasks whose columns it has (a captioning set has no questions).
        served = served_tasks(tasks, table.columns, requested=requested)
        if not served:
            raise ValueError(
                f"the calibration table has the columns of none of the tasks {list(tasks)} "
                f"(it has {sorted(table.columns)})"
            )
        tasks = served
        n = min(n_samples, len(table))
        if n == 0:
            raise ValueError("the calibration table is empty")
        order = torch.randperm(len(table), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        rows = table.iloc[sorted(order)].reset_index(drop=True)
        batches = []
        for start in range(0, n, batch_size):
            chunk = rows.iloc[start : start + batch_size]
            images = [open_image(dataset_root, rel) for rel in chunk["image"]]
            task = tasks[(start // batch_size) % len(tasks)]
            spec = get_task(task)
            encoded = loaded.adapter.encode(loaded, images, spec.prompts(chunk, loaded.adapter), spec.targets(chunk, 0))
            batch = {k: v for k, v in encoded.inputs.items() if k != "labels"}
            batches.append(batch)
        description = {"n_samples": n, "batch_size": batch_size, "tasks": list(tasks), "seed": seed}
        return cls(batches, description)


def layer_groups(refs: list[ModuleRef], parts: Parts) -> list[tuple[str | None, list[ModuleRef]]]:
    """``refs`` grouped by their layer, in pipeline order; modules outside layers come last, one each.

    Each group is ``(layer name or None, refs)``.
    """
    groups: dict[tuple[str, int], list[ModuleRef]] = {}
    loose = []
    for ref in refs:
        if ref.layer_index is None:
            loose.append(ref)
        else:
            groups.setdefault((ref.part, ref.layer_index), []).append(ref)
    order = {part: i for i, part in enumerate(parts)}
    keyed = sorted(groups.items(), key=lambda item: (order.get(item[0][0], len(order)), item[0][1]))
    out: list[tuple[str | None, list[ModuleRef]]] = [(parts[p][i][0], g) for (p, i), g in keyed]
    out += [(None, [ref]) for ref in loose]
    return out


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    layer: nn.Module | None,
    refs: list[ModuleRef],
    calibration: Calibration,
    consume: Callable[[ModuleRef, torch.Tensor], None],
) -> None:
    """Call ``consume(ref, x)`` with the 2-D input (tokens x in_features) of each ref, batch by batch.

    Forward passes stop right after ``layer`` (when given), so later layers cost nothing.
    Padding positions are dropped from the language model's captured inputs (by the batch's
    ``attention_mask``), so calibration statistics do not depend on how samples were batched.
    """
    handles = []
    current_mask: list[torch.Tensor | None] = [None]

    def make_hook(ref: ModuleRef) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            mask = current_mask[0]
            if ref.part == "language" and mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
                x = x[mask.bool()]
            consume(ref, x.reshape(-1, x.shape[-1]).float())

        return hook

    def stop(_module: nn.Module, _args: Any, _output: Any) -> None:
        raise _LayerDone

    try:
        for ref in refs:
            handles.append(ref.module.register_forward_pre_hook(make_hook(ref)))
        if layer is not None:
            handles.append(layer.register_forward_hook(stop))
        was_training = model.training
        model.eval()
        for batch in _on_device(calibration.batches, model):
            current_mask[0] = batch.get("attention_mask")
            try:
                model(**batch)
            except _LayerDone:
                pass
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()


def _on_device(batches: list[dict[str, torch.Tensor]], model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    param = next(model.parameters())
    for batch in batches:
        yield {k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}
