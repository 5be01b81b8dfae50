"""Drawing for the synthetic problems: flat palette colours without anti-aliasing, so tests (and anyone
auditing the data) can re-derive every answer from the pixels."""

from __future__ import annotations

import math
import random
from functools import cache

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
# The hands differ in colour as well as length and the hour hand lies on top, so both stay readable
# (and checkable) where they cross.
HOUR_HAND = (30, 30, 110)
MINUTE_HAND = (150, 20, 20)
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
    "pink": (240, 110, 180),
    "cyan": (30, 190, 200),
    "brown": (140, 90, 40),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_HINT = "Answer with a single number."
LETTER_HINT = "Answer with the option letter."

Problem = tuple[Image.Image, str, str, list[str] | None]


@cache
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def canvas(image_size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"  # flat glyphs: every pixel is exactly the ink colour or the background
    return image, draw


def cells(rng: random.Random, grid: int, k: int, image_size: int) -> list[tuple[int, int, int]]:
    """Distinct grid cells as `(x0, y0, cell)`: one object per cell, so objects never touch."""
    cell = image_size // grid
    picked = rng.sample(range(grid * grid), k)
    return [((p % grid) * cell, (p // grid) * cell, cell) for p in picked]


def shape_at(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, size: int, color) -> None:
    """A filled `shape` in the `size` x `size` box whose top-left corner is (x, y)."""
    if shape == "circle":
        draw.ellipse((x, y, x + size - 1, y + size - 1), fill=color)
    elif shape == "square":
        draw.rectangle((x, y, x + size - 1, y + size - 1), fill=color)
    else:
        draw.polygon([(x + size // 2, y), (x + size - 1, y + size - 1), (x, y + size - 1)], fill=color)


def draw_shape(draw: ImageDraw.ImageDraw, rng: random.Random, shape: str, box, color) -> None:
    """`shape` at a random size (55-80% of the cell) and place inside the grid cell `box`."""
    x0, y0, cell = box
    size = int(cell * rng.uniform(0.55, 0.8))
    x = x0 + rng.randint(2, max(2, cell - size - 2))
    y = y0 + rng.randint(2, max(2, cell - size - 2))
    shape_at(draw, shape, x, y, size, color)


def scatter(rng: random.Random, objects: list[tuple[str, str]], grid: int, image_size: int) -> Image.Image:
    image, draw = canvas(image_size)
    for (color, shape), box in zip(objects, cells(rng, grid, len(objects), image_size), strict=True):
        draw_shape(draw, rng, shape, box, PALETTE[color])
    return image


def multiple_choice(prompt: str, options: list[str], correct: str) -> tuple[str, str]:
    listed = "\n".join(f"{chr(65 + i)}. {text}" for i, text in enumerate(options))
    return f"{prompt}\nChoices:\n{listed}\n{LETTER_HINT}", chr(65 + options.index(correct))


def hand_end(centre: float, radius: float, fraction: float, turns: float) -> tuple[float, float]:
    angle = 2 * math.pi * turns
    return centre + radius * fraction * math.sin(angle), centre - radius * fraction * math.cos(angle)
