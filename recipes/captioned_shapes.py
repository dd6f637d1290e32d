"""A captioned test set that makes prompt-following measurable: 32x32 colour scenes of one shape (circle,
square or triangle) in one of four colours, small or large, in one of the four quadrants, each with a caption
that says exactly that ("a small red circle at the top left"; some captions leave out the size or the
position). A few colour-shape pairs never occur in the written set (e.g. no red triangle), so that prompts
combining attributes never seen together can be tested.

Writes OUT/images/<shape>/<n>.png with its caption beside it (<n>.txt; the sub-folder is the label),
OUT/prompts_seen.txt and OUT/prompts_unseen.txt (one full caption per combination, seen in training or
not), and OUT/recipe.json (the settings and the held-out pairs). Then:
    python build_dataset.py --source OUT/images --out-dir runs/captions32/data --size 32 --channels 3
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.cli import OutDir, Seed, console, entry, make_app, stage  # noqa: E402 (after the path is set)
from core.errors import PipelineError  # noqa: E402

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 220), "yellow": (225, 195, 25)}
SIZES = {"small": 4.0, "large": 7.0}  # half the shape's width, in pixels
POSITIONS = {("top", "left"): (9, 9), ("top", "right"): (9, 23), ("bottom", "left"): (23, 9),
             ("bottom", "right"): (23, 23)}  # (row, column) of the centre in a 32x32 scene
UNSEEN_PAIRS = (("red", "triangle"), ("green", "circle"), ("blue", "square"))
SCENE = 32

app = make_app(__doc__)


def caption(shape: str, colour: str, size: str | None, position: tuple[str, str] | None) -> str:
    words = ["a"] + ([size] if size else []) + [colour, shape]
    if position:
        words += ["at", "the", *position]
    return " ".join(words)


def draw_scene(shape: str, colour: str, size: str, position: tuple[str, str], rng: np.random.Generator) -> Image.Image:
    """The shape on a white ground, its centre jittered by up to 1.5 pixels and its size by 10%."""
    image = Image.new("RGB", (SCENE, SCENE), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    row, column = POSITIONS[position]
    cy, cx = row + rng.uniform(-1.5, 1.5), column + rng.uniform(-1.5, 1.5)
    half = SIZES[size] * rng.uniform(0.9, 1.1)
    fill = COLOURS[colour]
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return image


def combinations(unseen: bool) -> list[tuple[str, str, str, tuple[str, str]]]:
    """(shape, colour, size, position) of every combination whose colour-shape pair is (not) held out."""
    return [(shape, colour, size, position)
            for shape, colour, size, position in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS)
            if ((colour, shape) in UNSEEN_PAIRS) == unseen]


@app.command()
@stage
def main(out_dir: OutDir,
         count: Annotated[int, typer.Option(min=1, help="scenes to write")] = 6000,
         partial: Annotated[float, typer.Option(min=0.0, max=1.0, help="share of captions that leave out the size "
                                                                          "or the position")] = 0.3,
         seed: Seed = 0) -> None:
    if (out_dir / "images").exists():
        raise PipelineError(f"{out_dir / 'images'} already exists; remove it or choose another --out-dir")
    rng = np.random.default_rng(seed)
    seen = combinations(unseen=False)
    for n in range(count):
        shape, colour, size, position = seen[rng.integers(len(seen))]
        folder = out_dir / "images" / shape
        folder.mkdir(parents=True, exist_ok=True)
        draw_scene(shape, colour, size, position, rng).save(folder / f"{n:05d}.png")
        said_size, said_position = size, position
        if rng.random() < partial:  # leave out the size or the position
            if rng.random() < 0.5:
                said_size = None
            else:
                said_position = None
        (folder / f"{n:05d}.txt").write_text(caption(shape, colour, said_size, said_position) + "\n")
    for name, unseen in (("prompts_seen.txt", False), ("prompts_unseen.txt", True)):
        (out_dir / name).write_text("".join(caption(*c) + "\n" for c in combinations(unseen)))
    (out_dir / "recipe.json").write_text(json.dumps({
        "count": count, "partial": partial, "seed": seed, "shapes": SHAPES, "colours": list(COLOURS),
        "sizes": list(SIZES), "positions": [" ".join(p) for p in POSITIONS],
        "unseen_pairs": [" ".join(p) for p in UNSEEN_PAIRS]}, indent=2) + "\n")
    console.print(f"wrote {count} captioned scenes to {out_dir / 'images'}, {len(seen)} seen and "
                  f"{len(combinations(True))} unseen combinations in {out_dir}/prompts_*.txt")


if __name__ == "__main__":
    entry(app)
