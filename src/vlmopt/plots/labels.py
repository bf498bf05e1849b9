"""Point labels that do not overlap: each label goes to the first free place around its point.

:func:`label_points` tries offsets in eight directions at growing distances (a thin leader line
joins a label placed away from its point) and keeps a label clear of labels already placed, of the
other points' markers and of the axes' edges. Points are labelled in priority order (the Pareto
front first); a label with no free place is left out and counted. A panel with more than
:data:`LABEL_ALL_MAX` points labels only its priority points (the front), since names of a
thousand variants cannot be read anyway: their colour (method) and the table say what they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["LABEL_ALL_MAX", "label_points"]

#: Above this many points in a panel, only the priority points (the front) are labelled.
LABEL_ALL_MAX = 60

# Offsets (points) from the marker to the label's anchor, nearest first: eight directions at each
# distance. (dx, dy, horizontal alignment, vertical alignment).
_DIRECTIONS = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
# Further away, eight more directions in between.
_MORE = [(1, 0.5), (1, -0.5), (-1, 0.5), (-1, -0.5), (0.5, 1), (-0.5, 1), (0.5, -1), (-0.5, -1)]
_DISTANCES = (5, 14, 26, 40, 56, 75, 95)


def _offsets() -> list[tuple[float, float, str, str]]:
    out = []
    for d in _DISTANCES:
        for dx, dy in _DIRECTIONS + (_MORE if d >= 26 else []):
            ha = "left" if dx > 0.25 else "right" if dx < -0.25 else "center"
            va = "bottom" if dy > 0.25 else "top" if dy < -0.25 else "center"
            out.append((dx * d, dy * d, ha, va))
    return out


def _box(px: float, py: float, width: float, height: float, ha: str, va: str) -> tuple[float, float, float, float]:
    left = {"left": px, "right": px - width, "center": px - width / 2}[ha]
    bottom = {"bottom": py, "top": py - height, "center": py - height / 2}[va]
    return left, bottom, left + width, bottom + height


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _crosses(segment: tuple[float, float, float, float], box: tuple[float, float, float, float]) -> bool:
    """Whether the segment (x0, y0, x1, y1) passes through the box (sampled at 16 points)."""
    x0, y0, x1, y1 = segment
    for t in np.linspace(0.0, 1.0, 16):
        px, py = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
        if box[0] < px < box[2] and box[1] < py < box[3]:
            return True
    return False


def label_points(
    ax,
    x: Sequence[float],
    y: Sequence[float],
    names: Sequence[str],
    *,
    priority: Sequence[bool] | None = None,
    fontsize: float = 7,
    marker_radius: float = 5.0,
    max_labels: int = LABEL_ALL_MAX,
) -> dict[str, int]:
    """Label the points (x, y) with ``names`` without overlaps; return counts ``placed``/``left_out``.

    ``priority`` marks the points labelled first (and the only ones when there are more than
    ``max_labels`` points). Points with a missing coordinate are not labelled. Places are computed
    in display pixels with each text's rendered size, so call this once the figure's layout and the
    axes' limits are final (after ``tight_layout``; it calls ``autoscale_view``).
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    names = [str(n) for n in names]
    if not (len(x) == len(y) == len(names)):
        raise ValueError(f"x, y and names differ in length: {len(x)}, {len(y)}, {len(names)}")
    first = np.zeros(len(x), dtype=bool) if priority is None else np.asarray(priority, dtype=bool)
    ok = ~(np.isnan(x) | np.isnan(y))
    candidates = np.flatnonzero(ok)
    if len(candidates) > max_labels:
        candidates = candidates[first[candidates]]
    # Priority points first, then the best quality first: they are the ones readers look for.
    order = sorted(candidates, key=lambda i: (not first[i], -y[i], names[i]))
    ax.autoscale_view()
    renderer = ax.figure.canvas.get_renderer()
    scale = ax.figure.dpi / 72
    bbox = ax.get_window_extent()
    frame = (bbox.x0, bbox.y0, bbox.x1, bbox.y1)
    pixels = ax.transData.transform(np.column_stack([np.where(ok, x, 0), np.where(ok, y, 0)]))
    r = marker_radius * scale
    obstacles = [(px - r, py - r, px + r, py + r) for (px, py), good in zip(pixels, ok, strict=True) if good]
    placed: list[tuple[float, float, float, float]] = []
    leaders: list[tuple[float, float, float, float]] = []
    counts = {"placed": 0, "left_out": 0}
    # Points whose markers overlap (centres closer than a marker's width) share one label, a line
    # per name: no place near one of them is free of the others' markers.
    groups: list[list[int]] = []
    grouped: set[int] = set()
    for i in order:
        if i in grouped:
            continue
        near = [j for j in order if j not in grouped and np.hypot(*(pixels[j] - pixels[i])) < 2 * r]
        grouped.update(near)
        groups.append(near)
    for group in groups:
        i = group[0]
        px, py = pixels[i]
        text = "\n".join(dict.fromkeys(names[j] for j in group))
        probe = ax.text(0, 0, text, fontsize=fontsize)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        width, height = extent.width + 2 * scale, extent.height + scale
        for dx, dy, ha, va in _offsets():
            box = _box(px + dx * scale, py + dy * scale, width, height, ha, va)
            inside = box[0] >= frame[0] and box[1] >= frame[1] and box[2] <= frame[2] and box[3] <= frame[3]
            if not inside or any(_overlaps(box, b) for b in placed) or any(_overlaps(box, b) for b in obstacles):
                continue
            far = max(abs(dx), abs(dy)) > _DISTANCES[0]
            # A leader line may cross neither a label already placed, nor may this label sit on one.
            leader = (px, py, px + dx * scale, py + dy * scale)
            if any(_crosses(seg, box) for seg in leaders) or (far and any(_crosses(leader, b) for b in placed)):
                continue
            if far:
                leaders.append(leader)
            ax.annotate(
                text,
                (x[i], y[i]),
                xytext=(dx, dy),
                textcoords="offset points",
                ha=ha,
                va=va,
                fontsize=fontsize,
                color="#333333",
                arrowprops={"arrowstyle": "-", "color": "#999999", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 3}
                if far
                else None,
            )
            placed.append(box)
            counts["placed"] += len(group)
            break
        else:
            counts["left_out"] += len(group)
    return counts
