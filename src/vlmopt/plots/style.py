"""What every static figure shares: the matplotlib setup, the colours and markers, the tasks a summary
has headline metrics of, and how a figure is saved."""

from __future__ import annotations

import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from vlmopt.tasks import TASKS  # noqa: E402

__all__ = ["MARKERS", "METHOD_COLOURS", "PALETTE", "method_colour", "plt"]

# Okabe-Ito first: distinguishable with the common colour-vision deficiencies.
PALETTE = [
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#F0E442",
    "#000000",
    # Beyond eight variants: Paul Tol's muted scheme, also colour-blind safe.
    "#882255",
    "#44AA99",
    "#999933",
    "#AA4499",
    "#332288",
    "#DDCC77",
]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]

#: One colour per compression method, the same in every figure (the summary's ``method`` column:
#: a variant's methods joined by "+", "none" for baselines and finetuned models).
METHOD_COLOURS = {
    "none": "#000000",
    "uniform": "#0072B2",
    "gptq": "#56B4E9",
    "awq": "#009E73",
    "dynamic_int8": "#E69F00",
    "precision": "#999933",
    "svd": "#CC79A7",
    "prune_layers": "#D55E00",
    "prune_heads": "#882255",
    "lora": "#44AA99",
}
# Methods combined in one variant ("prune_layers+lora"): colours left over, chosen from the name.
_COMBINED = ["#332288", "#DDCC77", "#AA4499", "#117733", "#88CCEE", "#661100"]


def method_colour(method: str | None) -> str:
    """The colour of a method (or of a "+"-joined sequence of methods) in every figure.

    A single method has a fixed colour; a combination gets one of the colours no single method
    uses, picked by a checksum of its name, so it is the same in every figure and every study.
    A missing method (older tables) counts as "none".
    """
    if method is None or (isinstance(method, float) and method != method):
        method = "none"
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    return _COMBINED[zlib.crc32(str(method).encode()) % len(_COMBINED)]


def _tasks(df: pd.DataFrame) -> list[str]:
    """The tasks of ``df`` whose headline metric is one of its columns, in the registry's order."""
    present = set(df["task"])
    return [name for name, task in TASKS.items() if name in present and task.headline in df.columns]


def _save(fig: plt.Figure, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    return out
