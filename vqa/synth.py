"""A deterministic, offline synthetic VQA data set in the style of Sort-of-CLEVR (Santoro et al. 2017).

Each scene is a 4 x 4 grid of cells on a light grey background holding 3 to 5 filled shapes, each
in its own cell and each in a colour no other object in the scene has. Every image gets five
questions, one per type in ``SYNTH_TYPES``, whose answers follow from the scene alone.

Every image draws from its own random stream, seeded by ``(seed, split, index)``, so a data set is
reproducible bit for bit, and changing one split's size changes neither the other split nor the
first images of its own.

Usage::

    python -m vqa.synth --out data/synth --seed 0 --train-images 2000 --val-images 300
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from lora import atomic_path

from .cli import run_tool, user_path

__all__ = [
    "COLORS",
    "SHAPES",
    "SYNTH_TYPES",
    "QUADRANTS",
    "BACKGROUND",
    "GRID",
    "CSV_HEADER",
    "SceneObject",
    "make_scene",
    "render_scene",
    "make_questions",
    "quadrant",
    "generate",
    "main",
]

# Far apart in RGB (closest pair, orange/yellow, is ~100 apart) and far from the background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 225, 30),
    "purple": (140, 50, 180),
    "orange": (255, 135, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SYNTH_TYPES: tuple[str, ...] = ("color", "shape", "location", "count", "yes/no")
QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
BACKGROUND: tuple[int, int, int] = (211, 211, 211)
GRID = 4  # the image is GRID x GRID cells
CSV_HEADER: tuple[str, ...] = ("image", "question", "answer", "question_type")

_MIN_OBJECTS, _MAX_OBJECTS = 3, 5
_MIN_SIZE, _MAX_SIZE = 0.55, 0.8  # object side as a fraction of the cell side
_MAX_JITTER = 0.08  # centre offset / cell side; 0.8 / 2 + 0.08 < 0.5 keeps objects in their cell
_MIN_IMAGE_SIZE = 32


@dataclass(frozen=True)
class SceneObject:
    """One filled shape; ``box`` is its inclusive pixel bounding box ``(x0, y0, x1, y1)``."""

    color: str
    shape: str
    row: int
    col: int
    box: tuple[int, int, int, int]


def quadrant(row: int, col: int) -> str:
    """The quadrant name of a grid cell: rows 0-1 are top, columns 0-1 are left."""
    return f"{'top' if row < GRID // 2 else 'bottom'} {'left' if col < GRID // 2 else 'right'}"


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise TypeError(f"image_size must be an int, got {type(image_size).__name__}")
    if image_size < _MIN_IMAGE_SIZE or image_size % GRID:
        raise ValueError(
            f"image_size must be a multiple of {GRID} and >= {_MIN_IMAGE_SIZE} (the image is a "
            f"{GRID} x {GRID} grid of equal cells), got {image_size}; try 112"
        )


def make_scene(rng: random.Random, image_size: int = 112) -> list[SceneObject]:
    """Draws a random scene: 3-5 objects in distinct cells with distinct colours, some shape unique.

    Raises:
        ValueError: if ``image_size`` is not a multiple of 4 or is below 32.
    """
    _check_image_size(image_size)
    cell = image_size // GRID
    n = rng.randint(_MIN_OBJECTS, _MAX_OBJECTS)
    cells = rng.sample(range(GRID * GRID), n)
    colors = rng.sample(list(COLORS), n)
    # The color question needs a shape that names exactly one object.
    while True:
        shapes = [rng.choice(SHAPES) for _ in range(n)]
        if 1 in Counter(shapes).values():
            break
    objects = []
    for index, color, shape in zip(cells, colors, shapes):
        row, col = divmod(index, GRID)
        half = rng.uniform(_MIN_SIZE, _MAX_SIZE) * cell / 2
        cx = (col + 0.5 + rng.uniform(-_MAX_JITTER, _MAX_JITTER)) * cell
        cy = (row + 0.5 + rng.uniform(-_MAX_JITTER, _MAX_JITTER)) * cell
        # Keep the pixels whose centres lie in the float box: they stay inside the cell by construction.
        box = (
            math.ceil(cx - half - 0.5),
            math.ceil(cy - half - 0.5),
            math.floor(cx + half - 0.5),
            math.floor(cy + half - 0.5),
        )
        objects.append(SceneObject(color, shape, row, col, box))
    return objects


def render_scene(objects: Sequence[SceneObject], image_size: int = 112) -> Image.Image:
    """Draws the objects, unantialiased, on a grey RGB canvas, so every pixel is an exact palette colour."""
    _check_image_size(image_size)
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        fill = COLORS[obj.color]
        x0, y0, x1, y1 = obj.box
        if obj.shape == "circle":
            draw.ellipse(obj.box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(obj.box, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    return image


def make_questions(objects: Sequence[SceneObject], rng: random.Random) -> list[tuple[str, str, str]]:
    """One ``(question, answer, question_type)`` per type, in ``SYNTH_TYPES`` order."""
    counts = Counter(obj.shape for obj in objects)
    unique = [shape for shape in SHAPES if counts[shape] == 1]
    if not unique:
        raise ValueError("the scene needs a shape that occurs exactly once to ask a color question")

    shape = rng.choice(unique)
    color_q = (f"What color is the {shape}?", next(o.color for o in objects if o.shape == shape), "color")

    obj = rng.choice(objects)
    shape_q = (f"What shape is the {obj.color} object?", obj.shape, "shape")

    obj = rng.choice(objects)
    location_q = (f"Where is the {obj.color} object?", quadrant(obj.row, obj.col), "location")

    shape = rng.choice(SHAPES)
    count_q = (f"How many {shape}s are there?", str(counts[shape]), "count")

    # A coin first, then a pair to match it, keeps yes/no balanced whatever the scene looks like.
    if rng.random() < 0.5:
        obj = rng.choice(objects)
        color, shape, answer = obj.color, obj.shape, "yes"
    else:
        present = {(o.color, o.shape) for o in objects}
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        (color, shape), answer = rng.choice(absent), "no"
    article = "an" if color[0] in "aeiou" else "a"
    yes_no_q = (f"Is there {article} {color} {shape}?", answer, "yes/no")

    return [color_q, shape_q, location_q, count_q, yes_no_q]


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}; pass 0 to skip that split")


def _write_images(out_dir: Path, split: str, num_images: int, seed: int, image_size: int) -> list[tuple]:
    """Writes the split's images; returns its CSV rows."""
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_images):
        rng = random.Random(f"{seed}-{split}-{i}")
        objects = make_scene(rng, image_size)
        name = f"images/{split}_{i:05d}.png"
        image = render_scene(objects, image_size)
        _replace_atomically(out_dir / name, lambda tmp: image.save(tmp, format="PNG"))
        rows.extend((name, question, answer, qtype) for question, answer, qtype in make_questions(objects, rng))
    return rows


def _write_csv(path: Path, rows: list[tuple]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        writer.writerows(rows)


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Calls ``write(tmp)`` for a file beside ``path``, then renames it over ``path``.

    Readers see the old file or the whole new one, never half of one; the rename is atomic because
    both names are in one folder.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generate(
    out_dir: str | os.PathLike,
    *,
    train_images: int = 2000,
    val_images: int = 300,
    seed: int = 0,
    image_size: int = 112,
) -> tuple[Path, Path]:
    """Writes ``images/{split}_NNNNN.png`` and ``{train,val}.csv`` under ``out_dir``; returns the CSV paths.

    Existing files of the same names are overwritten; other files in ``out_dir`` are left alone.

    Raises:
        ValueError: if a count is negative or ``image_size`` is not a multiple of 4 that is >= 32.
    """
    _check_count("train_images", train_images)
    _check_count("val_images", val_images)
    _check_image_size(image_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    out_dir = Path(out_dir)
    train_rows = _write_images(out_dir, "train", train_images, seed, image_size)
    val_rows = _write_images(out_dir, "val", val_images, seed, image_size)
    # The CSVs after every image, both written before either is renamed into place, train.csv last: a
    # generation cut short leaves no train.csv (but for the moment between the two renames), and the demo
    # then generates again rather than training on half a data set. Fsynced: a CSV on disk names only
    # images already there.
    train_csv, val_csv = out_dir / "train.csv", out_dir / "val.csv"
    with atomic_path(train_csv) as train_tmp, atomic_path(val_csv) as val_tmp:  # renamed val, then train
        _write_csv(train_tmp, train_rows)
        _write_csv(val_tmp, val_rows)
    return train_csv, val_csv


_IMAGE_NAME = re.compile(r"images/(train|val)_\d{5,}\.png")  # five digits, more from the 100,000th image


def _synthetic_images(csv_path: Path) -> set[str] | None:
    """The images a CSV this module wrote names, or ``None`` for any other file (a user's own data set): its
    header and every image name are ours."""
    try:
        with open(csv_path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    named = [row for row in rows[1:] if row]  # a blank line is no row
    if not rows or tuple(rows[0]) != CSV_HEADER or not all(_IMAGE_NAME.fullmatch(row[0]) for row in named):
        return None
    return {row[0] for row in named}


def main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m vqa.synth`` command line; returns the exit code (2 for bad arguments)."""
    parser = argparse.ArgumentParser(prog="python -m vqa.synth", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=user_path, help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--train-images", "--train_images", type=int, default=2000, help="default: 2000")
    parser.add_argument("--val-images", "--val_images", type=int, default=300, help="default: 300")
    parser.add_argument(
        "--image-size",
        "--image_size",
        type=int,
        default=112,
        help="side in pixels, a multiple of 4, >= 32 (default: 112)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the data set already in --out")
    args = parser.parse_args(argv)  # argparse itself exits 2 with "error:" on malformed options
    existing = [name for name in ("train.csv", "val.csv") if (args.out / name).exists()]
    if existing and not args.overwrite:
        print(f"error: {args.out} holds a data set already ({', '.join(existing)}); add --overwrite to replace "
              f"it, or choose another --out", file=sys.stderr)
        return 2
    old_images = set()
    for name in existing:
        images = _synthetic_images(args.out / name)
        if images is None:
            print(f"error: {args.out / name} is not a CSV this tool wrote (its header or image names differ), "
                  f"and --overwrite replaces only a synthetic set; choose another --out", file=sys.stderr)
            return 2
        old_images |= images
    try:
        train_csv, val_csv = generate(
            args.out,
            train_images=args.train_images,
            val_images=args.val_images,
            seed=args.seed,
            image_size=args.image_size,
        )
        # A smaller set than the one replaced: the old set's images past its counts go with it.
        for name in old_images - _synthetic_images(train_csv) - _synthetic_images(val_csv):
            (args.out / name).unlink(missing_ok=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --out names a file or a read-only folder
        print(f"error: cannot write to {args.out}: {e}", file=sys.stderr)
        return 2
    num_images = args.train_images + args.val_images
    print(
        f"wrote {num_images} images ({args.train_images} train, {args.val_images} val) and "
        f"{num_images * len(SYNTH_TYPES)} questions to {args.out}"
    )
    return 0


if __name__ == "__main__":
    run_tool(main)
