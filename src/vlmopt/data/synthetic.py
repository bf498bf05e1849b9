"""``shapes``: a synthetic captioning / VQA / retrieval / real-vs-generated dataset that a tiny model learns on CPU.

Each image (PNG, ``image_size`` square, RGB) shows 1-3 shapes of one type (circle, square,
triangle) and one colour (red, green, blue, yellow, purple, orange) on a plain light background,
grouped in one region: left, right, top, bottom or center. Left/right groups are stacked
vertically around x = 27 % / 73 % of the width; top/bottom/center groups lie in a row around
y = 27 % / 73 % / 50 % of the height; jitter of a few pixels keeps images distinct. Shapes are
separated by background, so each one is one connected blob of exactly its palette colour.

Per image the table holds five references, one per caption template ("two red circles on the
left", "there are two red circles on the left", ...), counts spelled "one"/"two"/"three", which
are also its retrieval captions (images with the same attributes share them); one
question whose type is spread evenly over color / count / shape / yes-no within each split (and
yes/no answers balanced among the yes-no questions); ten VQAv2-style answers of which 7-10 are the
correct one (digits for numbers) and the rest near misses ("two", "circles", a neighbouring
colour), so a correct prediction scores 100 % under min(1, matches / 3) while weaker ones do not;
and a real/generated label, half each.

The "generated" images carry a learnable artefact: a checkerboard of 2x2-pixel cells, +/-8 grey
levels, over the background, like the upsampling artefact of many image generators. Its fixed
phase makes it linearly visible to a patch embedding whose patch size is a multiple of 4 (the tiny
models use 8), and its 4-pixel period survives moderate resizing better than a 1-pixel one. Shapes
are identical in both classes, so the label shows only in the background texture and is
independent of every other attribute.

Each split draws from its own ``numpy`` generator seeded by ``(seed, crc32(split))``, so changing
``n_train`` leaves the test split as it was, and one seed gives byte-identical PNGs and tables.
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from vlmopt.data.schema import SPLITS, write_table

__all__ = [
    "ANSWER_TYPES",
    "COLORS",
    "COUNT_WORDS",
    "LABEL_KINDS",
    "LABEL_NAMES",
    "POSITIONS",
    "QUESTION_TYPES",
    "SHAPES",
    "TASKS",
    "make_shapes",
    "render_shapes",
    "shapes_references",
    "shapes_vqa",
]

log = logging.getLogger(__name__)


#: Palette colour of each colour word (saturated, far from the light background).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "center")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
QUESTION_TYPES = ("color", "count", "shape", "yes/no")
#: VQAv2 answer type of each question type.
ANSWER_TYPES = {"color": "other", "count": "number", "shape": "other", "yes/no": "yes/no"}
LABEL_NAMES = ("real", "generated")
#: What ``label`` / ``label_name`` can hold (the ``labels`` setting): each kind's names in label order.
LABEL_KINDS: dict[str, tuple[str, ...]] = {
    "real_vs_generated": LABEL_NAMES,
    "color": tuple(COLORS),
    "shape": SHAPES,
}

_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
_WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_WHERE_LONG = {
    "left": "on the left side of the image",
    "right": "on the right side of the image",
    "top": "near the top of the image",
    "bottom": "near the bottom of the image",
    "center": "in the middle of the image",
}
# Group centre (x, y) as fractions of the image size, and the axis the shapes line up along.
_ANCHOR = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
_VERTICAL = {"left", "right"}
# Shape side (uniform range) and gap between shapes, as fractions of the image size.
_SIDE = (0.14, 0.18)
_GAP = 0.06
# Near misses an annotator might give instead of the correct answer.
_COLOR_MISSES = {
    "red": ("orange", "dark red"),
    "green": ("dark green", "yellow"),
    "blue": ("purple", "dark blue"),
    "yellow": ("orange", "light yellow"),
    "purple": ("blue", "violet"),
    "orange": ("red", "yellow"),
}
_SHAPE_MISSES = {
    "circle": ("circles", "oval"),
    "square": ("squares", "rectangle"),
    "triangle": ("triangles", "pyramid"),
}
_CHECKER_AMPLITUDE = 8
_CHECKER_CELL = 2
_MIN_IMAGE_SIZE = 32
#: Tasks every split serves.
TASKS = ("captioning", "vqa", "classification", "retrieval", "real_vs_generated")
# Table columns: the dataset contract, then what was drawn (for per-attribute analysis and tests).
_COLUMNS = (
    "sample_id",
    "image",
    "references",
    "captions",
    "question",
    "answers",
    "answer_type",
    "question_type",
    "label",
    "label_name",
    "count",
    "color",
    "shape",
    "position",
)


def shapes_references(count: int, color: str, shape: str, position: str) -> list[str]:
    """Five reference captions for one image, each from a different template."""
    n = COUNT_WORDS[count]
    things = f"{color} {shape if count == 1 else _PLURAL[shape]}"
    be = "is" if count == 1 else "are"
    where = _WHERE[position]
    return [
        f"{n} {things} {where}",
        f"there {be} {n} {things} {where}",
        f"a picture of {n} {things} {_WHERE_LONG[position]}",
        f"{n} {things} {be} shown {where}",
        f"an image with {n} {things} {where}",
    ]


def shapes_vqa(
    question_type: str,
    count: int,
    color: str,
    shape: str,
    rng: np.random.Generator,
    *,
    yes: bool = True,
) -> tuple[str, list[str]]:
    """One question of ``question_type`` about the image and its ten VQAv2-style answers.

    ``yes`` picks whether a yes/no question is about what is drawn. 7-10 of the answers are the
    correct one; the rest are near misses drawn from ``rng``.
    """
    if question_type == "color":
        question = "what color is the shape?" if count == 1 else "what color are the shapes?"
        answer, misses = color, _COLOR_MISSES[color]
    elif question_type == "count":
        question = "how many shapes are there?"
        answer = str(count)
        misses = (COUNT_WORDS[count], str(count + 1 if count < 3 else count - 1))
    elif question_type == "shape":
        question = "what shape is shown?"
        answer, misses = shape, _SHAPE_MISSES[shape]
    elif question_type == "yes/no":
        asked_color, asked_shape = color, shape
        if not yes:
            # Change the colour, the shape, or both, so "no" cannot be read off one word alone.
            change = int(rng.integers(3))
            if change in (0, 2):
                asked_color = _pick_other(rng, tuple(COLORS), color)
            if change in (1, 2):
                asked_shape = _pick_other(rng, SHAPES, shape)
        article = "an" if asked_color[0] in "aeiou" else "a"
        question = f"is there {article} {asked_color} {asked_shape}?"
        answer = "yes" if yes else "no"
        misses = ("no" if yes else "yes",)
    else:
        raise ValueError(f"unknown question type {question_type!r}; known: {list(QUESTION_TYPES)}")
    n_correct = int(rng.integers(7, 11))
    answers = [answer] * n_correct + [misses[int(i)] for i in rng.integers(len(misses), size=10 - n_correct)]
    return question, [answers[i] for i in rng.permutation(10)]


def render_shapes(
    count: int,
    color: str,
    shape: str,
    position: str,
    *,
    generated: bool,
    image_size: int,
    rng: np.random.Generator,
) -> Image.Image:
    """Draw one shapes image; ``generated`` adds the background checkerboard artefact."""
    size = image_size
    grey = int(rng.integers(228, 247))
    tint = rng.integers(-6, 7, size=3)
    background = np.empty((size, size, 3), dtype=np.int16)
    background[:] = grey + tint
    if generated:
        background += _checkerboard(size)[:, :, None]
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), mode="RGB")

    side = max(4, int(round(size * rng.uniform(*_SIDE))))
    gap = max(3, int(round(size * _GAP)))
    pitch = side + gap
    jitter = max(1, int(round(size * 0.05)))
    cx = _ANCHOR[position][0] * size + int(rng.integers(-jitter, jitter + 1))
    cy = _ANCHOR[position][1] * size + int(rng.integers(-jitter, jitter + 1))
    draw = ImageDraw.Draw(image)
    fill = COLORS[color]
    for k in range(count):
        offset = (k - (count - 1) / 2) * pitch
        x, y = (cx, cy + offset) if position in _VERTICAL else (cx + offset, cy)
        x0 = int(round(x - side / 2))
        y0 = int(round(y - side / 2))
        x0 = min(max(x0, 1), size - side - 1)
        y0 = min(max(y0, 1), size - side - 1)
        x1, y1 = x0 + side - 1, y0 + side - 1
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")
    return image


def make_shapes(
    root: str | Path,
    *,
    seed: int = 0,
    n_train: int = 2000,
    n_val: int = 100,
    n_test: int = 200,
    image_size: int = 64,
    labels: str = "real_vs_generated",
) -> dict[str, Path]:
    """Write the shapes dataset under ``root``: ``images/<split>/<id>.png`` and ``<split>.parquet``.

    ``labels`` picks what ``label`` / ``label_name`` hold: ``real_vs_generated`` (0 real,
    1 generated), or for zero-shot classification ``color`` (the index in :data:`COLORS`, the
    colour word) or ``shape`` (the index in :data:`SHAPES`, the shape word); images, captions and
    questions are the same whichever is chosen, and only ``real_vs_generated`` serves that task.
    Returns split -> table path. Images are written first and each table last (atomically), so a
    table on disk always points at complete images.
    """
    if labels not in LABEL_KINDS:
        raise ValueError(f"shapes: labels must be one of {list(LABEL_KINDS)}, got {labels!r}")
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    for name, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ValueError(f"n_{name} must be a non-negative integer, got {n!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer) or image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {_MIN_IMAGE_SIZE}, got {image_size!r}")
    root = Path(root)
    start = time.perf_counter()
    out: dict[str, Path] = {}
    for split in SPLITS:
        table = _make_split(root, split, sizes[split], seed=seed, image_size=int(image_size))
        tasks = TASKS
        if labels != "real_vs_generated":
            names = LABEL_KINDS[labels]
            table["label"] = pd.Series([names.index(v) for v in table[labels]], dtype="int64")
            table["label_name"] = table[labels].astype(object)
            tasks = tuple(t for t in TASKS if t != "real_vs_generated")
        out[split] = write_table(table, root / f"{split}.parquet", tasks=tasks)
    log.info("wrote shapes dataset (%s) to %s in %.1f s", sizes, root, time.perf_counter() - start)
    return out


def _make_split(root: Path, split: str, n: int, *, seed: int, image_size: int) -> pd.DataFrame:
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    question_types = [QUESTION_TYPES[i] for i in _balanced(rng, len(QUESTION_TYPES), n)]
    labels = _balanced(rng, len(LABEL_NAMES), n)
    n_yes_no = question_types.count("yes/no")
    yes_answers = iter(_balanced(rng, 2, n_yes_no) == 0)
    colors = tuple(COLORS)

    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(max(n - 1, 0))))
    rows = []
    for i in range(n):
        sample_id = f"shapes-{split}-{i:0{width}d}"
        count = int(rng.integers(1, 4))
        color = colors[int(rng.integers(len(colors)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        position = POSITIONS[int(rng.integers(len(POSITIONS)))]
        qtype = question_types[i]
        label = int(labels[i])
        question, answers = shapes_vqa(
            qtype, count, color, shape, rng, yes=bool(next(yes_answers)) if qtype == "yes/no" else True
        )
        image = render_shapes(count, color, shape, position, generated=label == 1, image_size=image_size, rng=rng)
        relative = f"images/{split}/{sample_id}.png"
        image.save(root / relative, format="PNG", compress_level=6)
        references = shapes_references(count, color, shape, position)
        rows.append(
            {
                "sample_id": sample_id,
                "image": relative,
                "references": references,
                "captions": list(references),
                "question": question,
                "answers": answers,
                "answer_type": ANSWER_TYPES[qtype],
                "question_type": qtype,
                "label": label,
                "label_name": LABEL_NAMES[label],
                "count": count,
                "color": color,
                "shape": shape,
                "position": position,
            }
        )
    _remove_stale_images(image_dir, split, {f"{r['sample_id']}.png" for r in rows})
    # Explicit columns and dtypes keep an empty split a valid table too.
    return pd.DataFrame(rows, columns=_COLUMNS).astype({"label": "int64", "count": "int64"})


def _remove_stale_images(image_dir: Path, split: str, keep: set[str]) -> None:
    """Drop images of a previous, larger run so the folder holds exactly this split's images."""
    for path in image_dir.glob(f"shapes-{split}-*.png"):
        if path.name not in keep:
            path.unlink()


def _balanced(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    """``n`` values in ``range(k)``, each used ``n // k`` or ``n // k + 1`` times, in seeded order."""
    return rng.permutation(np.resize(np.arange(k), n)) if n else np.zeros(0, dtype=np.int64)


def _pick_other(rng: np.random.Generator, values: tuple[str, ...], exclude: str) -> str:
    others = [v for v in values if v != exclude]
    return others[int(rng.integers(len(others)))]


def _checkerboard(size: int) -> np.ndarray:
    ii, jj = np.indices((size, size))
    return np.where(
        (ii // _CHECKER_CELL + jj // _CHECKER_CELL) % 2 == 0, _CHECKER_AMPLITUDE, -_CHECKER_AMPLITUDE
    ).astype(np.int16)
