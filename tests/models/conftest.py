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
