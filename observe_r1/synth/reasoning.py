"""The reasoning families: counting, comparing counts, adding digits, comparing bars, reading a clock.

Each is a pure function `make_<family>(rng, level, image_size)` returning `(image, question, answer,
choices)`; `choices` is None for numeric answers, otherwise the option texts, and the answer is then the
option letter. They are beyond a model trained from scratch in minutes: the ladder's upper levels.
"""

from __future__ import annotations

import random

from observe_r1.synth.draw import (
    HOUR_HAND,
    INK,
    MINUTE_HAND,
    NUMBER_HINT,
    PALETTE,
    SHAPES,
    Problem,
    canvas,
    cells,
    font,
    hand_end,
    multiple_choice,
    scatter,
)


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
        scatter(rng, objects, grid, image_size),
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
    question, answer = multiple_choice(f"Are there more {a} shapes or more {b} shapes?", options, correct)
    return scatter(rng, objects, grid, image_size), question, answer, options


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
    image, draw = canvas(image_size)
    for digit, color, (x0, y0, cell) in zip(
        digits, colors, cells(rng, grid, n_digits, image_size), strict=True
    ):
        jitter = cell // 8
        xy = (x0 + cell // 2 + rng.randint(-jitter, jitter), y0 + cell // 2 + rng.randint(-jitter, jitter))
        draw.text(
            xy, str(digit), fill=PALETTE[color] if color else INK, font=font(int(cell * 0.55)), anchor="mm"
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
    image, draw = canvas(image_size)
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
    question, answer = multiple_choice(f"Which bar in the chart is the {word}?", options, correct)
    return image, question, answer, options


def make_clock(rng: random.Random, level: int, image_size: int) -> Problem:
    """Reading a clock: the hour alone at levels 1-2, then finer minutes, no numerals, closer options."""
    step = {1: 60, 2: 60, 3: 15, 4: 5, 5: 5}[level]
    hour, minute = rng.randint(1, 12), step * rng.randint(0, 60 // step - 1)
    image, draw = canvas(image_size)
    centre, radius = image_size / 2, image_size * 0.45
    draw.ellipse((centre - radius, centre - radius, centre + radius, centre + radius), outline=INK, width=3)
    for tick in range(60 if level < 5 else 12):
        inner = 0.9 if tick % 5 else 0.82
        turns = tick / 60 if level < 5 else tick / 12
        draw.line(
            (hand_end(centre, radius, inner, turns), hand_end(centre, radius, 0.97, turns)),
            fill=INK,
            width=1 if tick % 5 else 2,
        )
    if level in (1, 3):
        for h in range(1, 13):
            draw.text(
                hand_end(centre, radius, 0.68, h / 12),
                str(h),
                fill=INK,
                font=font(int(radius * 0.2)),
                anchor="mm",
            )
    hour_turns = ((hour % 12) + minute / 60) / 12
    for color, length, turns, width in (
        (MINUTE_HAND, 0.8, minute / 60, 60),
        (HOUR_HAND, 0.45, hour_turns, 40),
    ):
        tip = hand_end(centre, radius, length, turns)
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
    question, answer = multiple_choice("What time does the clock show?", options, correct)
    return image, question, answer, options
