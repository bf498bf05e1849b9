"""Fixtures shared by the family tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run each family's tests on one torch thread, restoring the setting afterwards.

    With two OpenMP threads on a 2-core machine shared with other processes, one training step of
    a tiny model was measured 10-70x slower (10 s instead of 0.14 s); one thread does not suffer.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def caption_batch(loaded, root, table, n: int = 16):
    """Encoded training batch: the first ``n`` images of ``table`` with their first reference caption."""
    from vlmopt.data.images import open_image

    rows = table.iloc[:n]
    images = [open_image(root, rel) for rel in rows["image"]]
    captions = [list(refs)[0] for refs in rows["references"]]
    return loaded.adapter.encode(loaded, images, [loaded.adapter.prompt("captioning")] * len(rows), captions)


def train_on_batch(loaded, encoded, *, steps: int, lr: float) -> tuple[list[float], dict]:
    """AdamW on one fixed batch (seed 0); the loss per step and the first step's gradients by name."""
    model = loaded.model
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses, grads = [], {}
    for step in range(steps):
        loss = model(**encoded.inputs).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses, grads
