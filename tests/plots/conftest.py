"""Fixtures of the figure tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _close_figures():
    """Close every matplotlib figure a test leaves open, also when it fails before closing its own."""
    yield
    from vlmopt.plots.style import plt

    plt.close("all")
