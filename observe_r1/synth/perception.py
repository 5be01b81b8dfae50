"""The perception families: the answer is in the pixels, one look away, within reach of a small model
trained from scratch on a CPU in minutes (the ladder's lower levels, and the experiments' task).

Each is a pure function `make_<family>(rng, level, image_size)` returning `(image, question, answer,
None)`, the answer one word. Levels make them harder with smaller targets, more distractors and closer
colours or sizes.
"""

from __future__ import annotations

import random

from observe_r1.synth.draw import PALETTE, SHAPES, Problem, canvas, cells, draw_shape, shape_at

WORD_HINT = "Answer with one word."
DISTRACTOR = "gray"
# Target colours by level: from three far-apart hues to a palette with close pairs (red, orange, pink, brown).
COLOURS = {
    1: ("red", "green", "blue"),
    2: ("red", "green", "blue", "yellow", "purple"),
    3: ("red", "green", "blue", "yellow", "purple", "orange", "cyan"),
    4: ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink", "brown"),
    5: ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink", "brown"),
}


def _place(rng: random.Random, cell: tuple[int, int, int], size: int) -> tuple[int, int]:
    """A random top-left corner for a `size` box inside a grid cell, 1 px clear of its edges."""
    x0, y0, side = cell
    room = max(1, side - size - 1)
    return x0 + rng.randint(1, room), y0 + rng.randint(1, room)


def make_colour(rng: random.Random, level: int, image_size: int) -> Problem:
    """The colour of the one coloured shape: smaller, among more gray shapes, and from closer hues."""
    grid = {1: 2, 2: 2, 3: 3, 4: 3, 5: 4}[level]
    low, high = {1: (0.75, 0.9), 2: (0.6, 0.8), 3: (0.45, 0.65), 4: (0.35, 0.5), 5: (0.25, 0.4)}[level]
    n_gray = {1: 0, 2: 0, 3: rng.randint(1, 2), 4: rng.randint(2, 4), 5: rng.randint(4, 6)}[level]
    colour = rng.choice(COLOURS[level])
    image, draw = canvas(image_size)
    target, *others = cells(rng, grid, 1 + n_gray, image_size)
    size = max(3, int(target[2] * rng.uniform(low, high)))
    shape_at(draw, rng.choice(SHAPES), *_place(rng, target, size), size, PALETTE[colour])
    for box in others:
        draw_shape(draw, rng, rng.choice(SHAPES), box, PALETTE[DISTRACTOR])
    noun = "shape" if not n_gray else f"shape that is not {DISTRACTOR}"
    return image, f"What colour is the {noun}? {WORD_HINT}", colour, None


def make_side(rng: random.Random, level: int, image_size: int) -> Problem:
    """Which half the named shape lies in: smaller, nearer the middle line, among more shapes."""
    columns = {1: 4, 2: 4, 3: 6, 4: 6, 5: 8}[level]
    cell = image_size // columns
    # The target's column counted from the middle line (0: next to it), far at level 1, adjacent at 5.
    offset = {1: columns // 2 - 1, 2: rng.randint(1, columns // 2 - 1), 3: rng.randint(0, 1), 4: 0, 5: 0}[
        level
    ]
    left = rng.random() < 0.5
    column = columns // 2 - 1 - offset if left else columns // 2 + offset
    row = rng.randrange(columns)
    colour, *rest = rng.sample([c for c in PALETTE if c != DISTRACTOR], 1 + level)
    image, draw = canvas(image_size)
    target = (column * cell, row * cell, cell)
    size = max(3, int(cell * {1: 0.9, 2: 0.8, 3: 0.7, 4: 0.55, 5: 0.45}[level]))
    shape_at(draw, rng.choice(SHAPES), *_place(rng, target, size), size, PALETTE[colour])
    free = [
        (c * cell, r * cell, cell) for c in range(columns) for r in range(columns) if (c, r) != (column, row)
    ]
    for box in rng.sample(free, level - 1):
        draw_shape(draw, rng, rng.choice(SHAPES), box, PALETTE[rng.choice(rest)])
    question = f"Is the {colour} shape in the left or the right half of the image? Answer left or right."
    return image, question, "left" if left else "right", None


def make_larger(rng: random.Random, level: int, image_size: int) -> Problem:
    """Which of two shapes of one kind is larger: their sizes closer, and other shapes around from level 4."""
    ratio = {1: 2.0, 2: 1.6, 3: 1.35, 4: 1.2, 5: 1.1}[level]
    grid = 2 if level <= 3 else 3
    big, small, *rest = rng.sample([c for c in PALETTE if c != DISTRACTOR], 2 + max(0, level - 3))
    shape = rng.choice(SHAPES)
    image, draw = canvas(image_size)
    boxes = cells(rng, grid, 2 + len(rest), image_size)
    big_size = max(4, int(boxes[0][2] * 0.85))
    small_size = max(2, min(big_size - 1, round(big_size / ratio)))
    shape_at(draw, shape, *_place(rng, boxes[0], big_size), big_size, PALETTE[big])
    shape_at(draw, shape, *_place(rng, boxes[1], small_size), small_size, PALETTE[small])
    for colour, box in zip(rest, boxes[2:], strict=True):
        draw_shape(draw, rng, rng.choice([s for s in SHAPES if s != shape]), box, PALETTE[colour])
    first, second = (big, small) if rng.random() < 0.5 else (small, big)
    question = f"Which shape is larger, the {first} one or the {second} one? Answer with its colour."
    return image, question, big, None
