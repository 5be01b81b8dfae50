"""Synthetic visual reasoning problems whose answers are exact, so a reward can check them.

Each family is a pure function `make_<family>(rng, level, image_size)` that returns
`(image, question, answer, choices)`; `choices` is None for numeric answers, otherwise the option
texts, and the answer is then the option letter. Shapes and digits are drawn in flat palette colours
without anti-aliasing, so tests (and anyone auditing the data) can re-derive answers from pixels.
Sample `i` depends only on `(seed, i, image_size)`, so a longer run extends a shorter one.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from observe_r1.data import Sample
from observe_r1.errors import InvalidValue
from observe_r1.io import atomic_dir

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 64, 1024
LEVELS = (1, 2, 3, 4, 5)
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
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _canvas(image_size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"  # flat glyphs: every pixel is exactly the ink colour or the background
    return image, draw


def _cells(rng: random.Random, grid: int, k: int, image_size: int) -> list[tuple[int, int, int]]:
    """Distinct grid cells as `(x0, y0, cell)`: one object per cell, so objects never touch."""
    cell = image_size // grid
    picked = rng.sample(range(grid * grid), k)
    return [((p % grid) * cell, (p // grid) * cell, cell) for p in picked]


def _draw_shape(draw: ImageDraw.ImageDraw, rng: random.Random, shape: str, box, color) -> None:
    x0, y0, cell = box
    size = int(cell * rng.uniform(0.55, 0.8))
    x = x0 + rng.randint(2, max(2, cell - size - 2))
    y = y0 + rng.randint(2, max(2, cell - size - 2))
    if shape == "circle":
        draw.ellipse((x, y, x + size - 1, y + size - 1), fill=color)
    elif shape == "square":
        draw.rectangle((x, y, x + size - 1, y + size - 1), fill=color)
    else:
        draw.polygon([(x + size // 2, y), (x + size - 1, y + size - 1), (x, y + size - 1)], fill=color)


def _scatter(rng: random.Random, objects: list[tuple[str, str]], grid: int, image_size: int) -> Image.Image:
    image, draw = _canvas(image_size)
    for (color, shape), box in zip(objects, _cells(rng, grid, len(objects), image_size), strict=True):
        _draw_shape(draw, rng, shape, box, PALETTE[color])
    return image


def _multiple_choice(prompt: str, options: list[str], correct: str) -> tuple[str, str]:
    listed = "\n".join(f"{chr(65 + i)}. {text}" for i, text in enumerate(options))
    return f"{prompt}\nChoices:\n{listed}\n{LETTER_HINT}", chr(65 + options.index(correct))


def make_count(rng: random.Random, level: int, image_size: int) -> Problem:
    """Counting under distractors: a bigger grid, more colours, and from level 3 a colour+shape target."""
    grid = level + 3
    colors = rng.sample(list(PALETTE), level + 1)
    shapes = list(SHAPES[: min(3, 1 + level // 2)])
    target = (colors[0], rng.choice(shapes) if level >= 3 else None)
    total = rng.randint(grid * grid // 3, grid * grid // 2)
    n_target = rng.randint(1, min(total - 1, 2 + 2 * level))
    others = [(c, s) for c in colors for s in shapes if c != target[0] or (target[1] and s != target[1])]
    objects = [(target[0], target[1] or rng.choice(shapes)) for _ in range(n_target)]
    objects += [rng.choice(others) for _ in range(total - n_target)]
    rng.shuffle(objects)
    noun = f"{target[0]} {target[1]}s" if target[1] else f"{target[0]} shapes"
    return (
        _scatter(rng, objects, grid, image_size),
        f"How many {noun} are in the image? {NUMBER_HINT}",
        str(n_target),
        None,
    )


def make_compare_count(rng: random.Random, level: int, image_size: int) -> Problem:
    """Comparing two counts is harder as they get closer (ties allowed) and distractors multiply."""
    grid = level + 3
    a, b, *rest = rng.sample(list(PALETTE), 2 + level)
    shapes = list(SHAPES[: min(3, level)])
    gap = rng.choice({1: (3, 4, 5), 2: (2, 3), 3: (1, 2), 4: (0, 1), 5: (0, 1)}[level])
    low = rng.randint(1, max(1, grid * grid // 4 - gap))
    n_a, n_b = (low + gap, low) if rng.random() < 0.5 else (low, low + gap)
    n_rest = rng.randint(level - 1, 2 * level) if rest else 0
    objects = [(a, rng.choice(shapes)) for _ in range(n_a)] + [(b, rng.choice(shapes)) for _ in range(n_b)]
    objects += [(rng.choice(rest), rng.choice(shapes)) for _ in range(n_rest)]
    rng.shuffle(objects)
    options = [f"more {a}", f"more {b}", "the same number"]
    correct = options[0 if n_a > n_b else 1 if n_b > n_a else 2]
    rng.shuffle(options)
    question, answer = _multiple_choice(f"Are there more {a} shapes or more {b} shapes?", options, correct)
    return _scatter(rng, objects, grid, image_size), question, answer, options


def make_digit_sum(rng: random.Random, level: int, image_size: int) -> Problem:
    """Reading and adding digits: more and smaller digits, and from level 4 only one colour counts."""
    n_digits, grid = {1: (2, 2), 2: (3, 3), 3: (4, 3), 4: (5, 4), 5: (7, 4)}[level]
    digits = [rng.randint(0, 9) for _ in range(n_digits)]
    if level >= 4:
        target, *others = rng.sample(list(PALETTE), 3)
        n_target = rng.randint(2, n_digits - 2)
        colors = [target] * n_target + [rng.choice(others) for _ in range(n_digits - n_target)]
        answer = sum(digits[:n_target])
        prompt = f"What is the sum of the {target} digits in the image?"
    else:
        colors = [rng.choice(list(PALETTE)) if level > 1 else None for _ in range(n_digits)]
        answer = sum(digits)
        prompt = "What is the sum of all the digits in the image?"
    image, draw = _canvas(image_size)
    for digit, color, (x0, y0, cell) in zip(
        digits, colors, _cells(rng, grid, n_digits, image_size), strict=True
    ):
        jitter = cell // 8
        xy = (x0 + cell // 2 + rng.randint(-jitter, jitter), y0 + cell // 2 + rng.randint(-jitter, jitter))
        draw.text(
            xy, str(digit), fill=PALETTE[color] if color else INK, font=_font(int(cell * 0.55)), anchor="mm"
        )
    return image, f"{prompt} {NUMBER_HINT}", str(answer), None


def make_bar_compare(rng: random.Random, level: int, image_size: int) -> Problem:
    """Finding the extreme bar: more bars, and the winning margin shrinks from 30% to 2.5% of the axis."""
    k = level + 1
    colors = rng.sample(list(PALETTE), k)
    margin = image_size // 10
    plot_h = image_size - 2 * margin
    gap = max(2, round(plot_h * {1: 0.3, 2: 0.18, 3: 0.1, 4: 0.05, 5: 0.025}[level]))
    tallest = rng.random() < 0.5
    if tallest:
        extreme = rng.randint(round(0.8 * plot_h), plot_h)
        pool = range(round(0.15 * plot_h), extreme - gap)
    else:
        extreme = rng.randint(round(0.1 * plot_h), round(0.25 * plot_h))
        pool = range(extreme + gap + 1, plot_h + 1)
    runner_up = extreme - gap if tallest else extreme + gap
    heights = [extreme, runner_up] + rng.sample(pool, k - 2)
    rng.shuffle(heights)
    image, draw = _canvas(image_size)
    base = image_size - margin
    slot = (image_size - 2 * margin) // k
    width = max(3, int(slot * 0.6))
    for i, (color, height) in enumerate(zip(colors, heights, strict=True)):
        x = margin + i * slot + (slot - width) // 2
        draw.rectangle((x, base - height, x + width - 1, base - 1), fill=PALETTE[color])
    draw.line((margin - 2, base, image_size - margin, base), fill=INK, width=2)
    draw.line((margin - 2, margin, margin - 2, base), fill=INK, width=2)
    correct = colors[heights.index(extreme)]
    options = rng.sample(colors, k)
    word = "tallest" if tallest else "shortest"
    question, answer = _multiple_choice(f"Which bar in the chart is the {word}?", options, correct)
    return image, question, answer, options


def _hand_end(centre: float, radius: float, fraction: float, turns: float) -> tuple[float, float]:
    angle = 2 * math.pi * turns
    return centre + radius * fraction * math.sin(angle), centre - radius * fraction * math.cos(angle)


def make_clock(rng: random.Random, level: int, image_size: int) -> Problem:
    """Reading a clock: the hour alone at levels 1-2, then finer minutes, no numerals, closer options."""
    step = {1: 60, 2: 60, 3: 15, 4: 5, 5: 5}[level]
    hour, minute = rng.randint(1, 12), step * rng.randint(0, 60 // step - 1)
    image, draw = _canvas(image_size)
    centre, radius = image_size / 2, image_size * 0.45
    draw.ellipse((centre - radius, centre - radius, centre + radius, centre + radius), outline=INK, width=3)
    for tick in range(60 if level < 5 else 12):
        inner = 0.9 if tick % 5 else 0.82
        turns = tick / 60 if level < 5 else tick / 12
        draw.line(
            (_hand_end(centre, radius, inner, turns), _hand_end(centre, radius, 0.97, turns)),
            fill=INK,
            width=1 if tick % 5 else 2,
        )
    if level in (1, 3):
        for h in range(1, 13):
            draw.text(
                _hand_end(centre, radius, 0.68, h / 12),
                str(h),
                fill=INK,
                font=_font(int(radius * 0.2)),
                anchor="mm",
            )
    hour_turns = ((hour % 12) + minute / 60) / 12
    for color, length, turns, width in (
        (MINUTE_HAND, 0.8, minute / 60, 60),
        (HOUR_HAND, 0.45, hour_turns, 40),
    ):
        tip = _hand_end(centre, radius, length, turns)
        draw.line(((centre, centre), tip), fill=color, width=max(2, image_size // width))
    draw.ellipse((centre - 4, centre - 4, centre + 4, centre + 4), fill=HOUR_HAND)
    if level <= 2:
        return image, f"What hour does the clock show? {NUMBER_HINT}", str(hour), None
    correct = f"{hour}:{minute:02d}"
    near = {
        f"{(hour + dh - 1) % 12 + 1}:{(minute + dm) % 60:02d}" for dh in (-1, 0, 1) for dm in (-step, 0, step)
    }
    swapped = f"{(minute // 5) or 12}:{(hour % 12) * 5:02d}"
    near = sorted((near | {swapped}) - {correct})
    options = [correct] + rng.sample(near, 3 if level < 5 else 4)
    rng.shuffle(options)
    question, answer = _multiple_choice("What time does the clock show?", options, correct)
    return image, question, answer, options


FAMILIES = {
    "count": make_count,
    "digit_sum": make_digit_sum,
    "bar_compare": make_bar_compare,
    "clock": make_clock,
    "compare_count": make_compare_count,
}


def make_sample(index: int, seed: int = 0, image_size: int = 224) -> tuple[str, int, Sample, Image.Image]:
    """Sample `index` alone: families rotate with the index and levels form a Latin square over them,
    so every run of len(FAMILIES) rows covers all families and every 25 rows all family/level pairs."""
    names = list(FAMILIES)
    family = names[index % len(names)]
    level = LEVELS[(index + index // len(names)) % len(LEVELS)]
    rng = random.Random(f"observe-r1-synth:{seed}:{index}")  # str seeds hash with SHA-512: stable everywhere
    image, question, answer, choices = FAMILIES[family](rng, level, image_size)
    sample = Sample(
        id=f"synth-{index:06d}",
        images=[f"images/{index:06d}.png"],
        question=question,
        answer=answer,
        choices=choices,
        level=level,
        source=f"synth/{family}",
    )
    return family, level, sample, image


def generate(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    image_size: int = 224,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write n problems to out_dir/data.jsonl with PNGs under out_dir/images/; returns the data.jsonl path."""
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise InvalidValue(f"image_size must lie in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size}")
    if n < 1:
        raise InvalidValue(f"n must be at least 1, got {n}")
    families: Counter[str] = Counter()
    levels: Counter[int] = Counter()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        with (tmp / "data.jsonl").open("w", encoding="utf-8") as f:
            for index in tqdm(range(n), desc="synth", unit="sample", disable=not progress):
                family, level, sample, image = make_sample(index, seed, image_size)
                image.save(tmp / sample.images[0], format="PNG")
                f.write(json.dumps(sample.to_row(), ensure_ascii=False) + "\n")
                families[family] += 1
                levels[level] += 1
        meta = {
            "n": n,
            "seed": seed,
            "image_size": image_size,
            "families": {name: families[name] for name in FAMILIES},
            "levels": {str(level): levels[level] for level in LEVELS},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return Path(out_dir) / "data.jsonl"
