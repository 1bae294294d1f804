"""Procedural captioned images (coloured shapes on patterned backgrounds): the small CLIP's training data and the demo dataset.

Pure Pillow + NumPy and deterministic for a seed. Each image carries its attributes; a caption names some
of them, and an image matches a caption when every attribute the caption names is the image's.
Some colour/shape combinations are held out of training so evaluation can ask for pairs never seen together.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

IMAGE_SIZE = 128
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (130, 40, 170),
    "pink": (245, 120, 190),
    "brown": (120, 75, 35),
}
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "centre", "bottom left", "bottom right")
BACKGROUNDS = ("plain", "striped", "dotted", "checkered")
# Pale, unsaturated grounds so no background could be read as one of the shape colours.
_GROUND_TONES = ((235, 235, 235), (215, 215, 210), (240, 232, 215), (200, 205, 210), (250, 250, 250), (185, 185, 185))
_CENTRES = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "centre": (0.5, 0.5),
            "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7)}
_RADIUS = {"small": 0.13, "large": 0.25}
# Never drawn for training: the semantic tests ask for these pairs by text.
HELD_OUT = frozenset({("red", "star"), ("blue", "triangle"), ("green", "square"),
                      ("yellow", "heart"), ("purple", "circle"), ("orange", "cross")})


@dataclass(frozen=True)
class ShapeScene:
    colour: str
    shape: str
    size: str
    position: str
    background: str

    @property
    def label(self) -> str:
        """`red-star`: the colour/shape class, as file names carry it."""
        return f"{self.colour}-{self.shape}"

    def attribute(self, name: str) -> str:
        return getattr(self, name)


@dataclass(frozen=True)
class Caption:
    text: str
    mentions: dict[str, str]

    def matches(self, scene: ShapeScene) -> bool:
        return all(scene.attribute(name) == value for name, value in self.mentions.items())


def random_scene(rng: random.Random, held_out: bool | None = False) -> ShapeScene:
    """A random scene; `held_out` False: never a held-out pair, True: always one, None: any pair."""
    while True:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if held_out is None or ((colour, shape) in HELD_OUT) == held_out:
            break
    return ShapeScene(colour, shape, rng.choice(SIZES), rng.choice(POSITIONS), rng.choice(BACKGROUNDS))


def render(scene: ShapeScene, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as an RGB image; `rng` jitters tones, pattern spacing, placement and rotation."""
    ground, ink = rng.sample(_GROUND_TONES, 2)
    image = Image.new("RGB", (size, size), ground)
    draw = ImageDraw.Draw(image)
    _draw_background(draw, scene.background, ink, size, rng)
    cx, cy = _CENTRES[scene.position]
    radius = _RADIUS[scene.size] * size * rng.uniform(0.85, 1.15)
    centre = ((cx + rng.uniform(-0.05, 0.05)) * size, (cy + rng.uniform(-0.05, 0.05)) * size)
    fill = tuple(int(np.clip(channel + rng.randint(-20, 20), 0, 255)) for channel in COLOURS[scene.colour])
    _draw_shape(draw, scene.shape, centre, radius, fill, rng.uniform(-0.3, 0.3))
    return image


def captions(scene: ShapeScene) -> list[Caption]:
    """Every phrasing of the scene, from "a red circle" to "small red circle in the top left on a dotted background"."""
    colour, shape, size, position, ground = scene.colour, scene.shape, scene.size, scene.position, scene.background
    core = {"colour": colour, "shape": shape}
    phrasings = [
        (f"a {colour} {shape}", core),
        (f"{colour} {shape}", core),
        (f"a photo of a {colour} {shape}", core),
        (f"a {size} {colour} {shape}", {**core, "size": size}),
        (f"{size} {colour} {shape} on a {ground} background", {**core, "size": size, "background": ground}),
        (f"a {colour} {shape} in the {position}", {**core, "position": position}),
        (f"a {colour} {shape} on a {ground} background", {**core, "background": ground}),
        (f"a {size} {colour} {shape} in the {position} on a {ground} background",
         {**core, "size": size, "position": position, "background": ground}),
        (f"a {shape}", {"shape": shape}),
        (f"something {colour}", {"colour": colour}),
        (f"a {colour} shape", {"colour": colour}),
    ]
    return [Caption(text, mentions) for text, mentions in phrasings]


def sample_caption(scene: ShapeScene, rng: random.Random) -> Caption:
    """One caption, most often naming colour and shape together (the pair is what retrieval must bind)."""
    options = captions(scene)
    partial = [caption for caption in options if len(caption.mentions) == 1]
    full = [caption for caption in options if caption not in partial]
    return rng.choice(partial) if rng.random() < 0.15 else rng.choice(full)


def scenes(count: int, seed: int, held_out: bool | None = False) -> Iterator[tuple[ShapeScene, Image.Image]]:
    rng = random.Random(seed)
    for _ in range(count):
        scene = random_scene(rng, held_out)
        yield scene, render(scene, rng)


def write_dataset(folder: Path, count: int, seed: int, queries: Path | None = None) -> list[Path]:
    """`count` JPEGs named `<colour>-<shape>-NNNN.jpg`, every colour/shape pair (held-out ones included).

    The pairs are dealt round-robin so each appears count/48 times. With `queries`, also one query image per
    pair (`<colour>-<shape>.jpg`, drawn with another seed) for `clipsearch evaluate`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    written = []
    for index in range(count):
        colour, shape = pairs[index % len(pairs)]
        scene = ShapeScene(colour, shape, rng.choice(SIZES), rng.choice(POSITIONS), rng.choice(BACKGROUNDS))
        path = folder / f"{scene.label}-{index:04d}.jpg"
        render(scene, rng).save(path, quality=90)
        written.append(path)
    if queries is not None:
        queries.mkdir(parents=True, exist_ok=True)
        query_rng = random.Random(seed + 1)
        for colour, shape in pairs:
            scene = ShapeScene(colour, shape, query_rng.choice(SIZES), query_rng.choice(POSITIONS), "plain")
            render(scene, query_rng).save(queries / f"{scene.label}.jpg", quality=90)
    return written


def _draw_background(draw: ImageDraw.ImageDraw, background: str, ink: tuple[int, int, int], size: int,
                     rng: random.Random) -> None:
    step = rng.randint(size // 16, size // 8)
    if background == "striped":
        width = max(2, step // 2)
        if rng.random() < 0.5:
            for x in range(0, size, step):
                draw.rectangle((x, 0, x + width - 1, size), fill=ink)
        else:
            for y in range(0, size, step):
                draw.rectangle((0, y, size, y + width - 1), fill=ink)
    elif background == "dotted":
        dot = max(1, step // 4)
        for x in range(step // 2, size, step):
            for y in range(step // 2, size, step):
                draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=ink)
    elif background == "checkered":
        for x in range(0, size, step):
            for y in range(0, size, step):
                if (x // step + y // step) % 2:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=ink)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], radius: float,
                fill: tuple[int, ...], turn: float) -> None:
    cx, cy = centre
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        return
    if shape == "square":
        points = _polygon(4, radius * 1.2, turn + math.pi / 4)
    elif shape == "triangle":
        points = _polygon(3, radius * 1.15, turn - math.pi / 2)
    elif shape == "star":
        points = [(math.cos(angle) * (radius * 1.15 if index % 2 == 0 else radius * 0.5),
                   math.sin(angle) * (radius * 1.15 if index % 2 == 0 else radius * 0.5))
                  for index, angle in enumerate(turn - math.pi / 2 + step * math.pi / 5 for step in range(10))]
    elif shape == "heart":
        points = [(radius * 0.06 * 16 * math.sin(t) ** 3,
                   -radius * 0.06 * (13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
                  for t in (step * 2 * math.pi / 40 for step in range(40))]
    elif shape == "cross":
        arm, half = radius, radius * 0.35
        points = [(-half, -arm), (half, -arm), (half, -half), (arm, -half), (arm, half), (half, half),
                  (half, arm), (-half, arm), (-half, half), (-arm, half), (-arm, -half), (-half, -half)]
        points = [_rotate(point, turn) for point in points]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    draw.polygon([(cx + x, cy + y) for x, y in points], fill=fill)


def _polygon(corners: int, radius: float, turn: float) -> list[tuple[float, float]]:
    return [(radius * math.cos(turn + 2 * math.pi * k / corners), radius * math.sin(turn + 2 * math.pi * k / corners))
            for k in range(corners)]


def _rotate(point: tuple[float, float], turn: float) -> tuple[float, float]:
    x, y = point
    return x * math.cos(turn) - y * math.sin(turn), x * math.sin(turn) + y * math.cos(turn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipsearch_tools.demo_images",
                                     description="Write the demo dataset of coloured shapes.")
    parser.add_argument("--out", type=Path, required=True, help="folder for the dataset images")
    parser.add_argument("--queries", type=Path, help="folder for one query image per colour/shape pair")
    parser.add_argument("--count", type=int, default=288)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    written = write_dataset(args.out, args.count, args.seed, args.queries)
    logger.info("wrote %d demo images to %s%s", len(written), args.out,
                f" and {len(COLOURS) * len(SHAPES)} query images to {args.queries}" if args.queries else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
