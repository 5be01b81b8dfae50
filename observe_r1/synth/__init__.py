"""Synthetic visual problems whose answers are exact, so a reward can check them.

Two kinds of family, each a pure function `make_<family>(rng, level, image_size)` that returns
`(image, question, answer, choices)` at levels 1-5: the perception families (observe_r1/synth/
perception.py: the colour of the one shape, which side it is on, which of two is larger), which a small
model learns on a CPU in minutes, and the reasoning families (reasoning.py: counting, comparing counts,
adding digits, comparing bars, reading a clock), which it does not. A run draws from the families it is
given (`--families`), rotating through them. Sample `i` depends only on `(seed, i, image_size, families)`,
so a longer run extends a shorter one.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from observe_r1.data import Sample
from observe_r1.errors import InvalidValue
from observe_r1.io import atomic_dir
from observe_r1.synth import perception, reasoning
from observe_r1.synth.draw import (  # noqa: F401 - the data contract the tests and users read
    BACKGROUND,
    HOUR_HAND,
    INK,
    LETTER_HINT,
    MINUTE_HAND,
    NUMBER_HINT,
    PALETTE,
    Problem,
)

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 64, 1024
LEVELS = (1, 2, 3, 4, 5)

REASONING_FAMILIES = {
    "count": reasoning.make_count,
    "digit_sum": reasoning.make_digit_sum,
    "bar_compare": reasoning.make_bar_compare,
    "clock": reasoning.make_clock,
    "compare_count": reasoning.make_compare_count,
}
PERCEPTION_FAMILIES = {
    "colour": perception.make_colour,
    "side": perception.make_side,
    "larger": perception.make_larger,
}
FAMILIES = {**REASONING_FAMILIES, **PERCEPTION_FAMILIES}
# Named sets for `--families`; the default keeps the data every earlier run drew.
PRESETS = {
    "reasoning": tuple(REASONING_FAMILIES),
    "perception": tuple(PERCEPTION_FAMILIES),
    "all": tuple(FAMILIES),
}
DEFAULT_FAMILIES = PRESETS["reasoning"]


def family_names(spec: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A preset name, a comma-separated list of families, or a sequence of names, as family names."""
    names = PRESETS.get(spec) if isinstance(spec, str) else None
    if names is None:
        names = tuple(n.strip() for n in spec.split(",")) if isinstance(spec, str) else tuple(spec)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names or len(set(names)) != len(names):
        raise InvalidValue(
            f"families {spec!r}: expected a preset ({', '.join(PRESETS)}) or distinct names from {', '.join(FAMILIES)}"
        )
    return names


def level_names(spec: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """Levels as a comma-separated string ("1,2") or a sequence of ints, each one of `LEVELS`."""
    try:
        levels = tuple(int(v) for v in spec.split(",")) if isinstance(spec, str) else tuple(spec)
    except ValueError:
        levels = ()
    if not levels or len(set(levels)) != len(levels) or not set(levels) <= set(LEVELS):
        raise InvalidValue(f"levels {spec!r}: expected distinct levels from {', '.join(map(str, LEVELS))}")
    return levels


def make_sample(
    index: int,
    seed: int = 0,
    image_size: int = 224,
    families: tuple[str, ...] = DEFAULT_FAMILIES,
    levels: tuple[int, ...] = LEVELS,
) -> tuple[str, int, Sample, Image.Image]:
    """Sample `index` alone: `families` rotate with the index and `levels` form a Latin square over
    them, so every run of len(families) rows covers all of them and every len(levels) x len(families)
    rows every family/level pair."""
    names = list(families)
    family = names[index % len(names)]
    # Row r of the square (every len(names) rows) shifts the levels by r: (family + r) mod len(levels).
    level = levels[(index % len(names) + index // len(names)) % len(levels)]
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
    families: str | tuple[str, ...] = DEFAULT_FAMILIES,
    levels: str | tuple[int, ...] = LEVELS,
) -> Path:
    """Write n problems to out_dir/data.jsonl with PNGs under out_dir/images/; returns the data.jsonl path.

    `families`: a preset of `PRESETS`, a comma-separated list or a sequence of `FAMILIES` names;
    `levels`: the levels drawn (all by default; the same rows as before for the default)."""
    names = family_names(families)
    level_set = level_names(levels)
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise InvalidValue(f"image_size must lie in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size}")
    if n < 1:
        raise InvalidValue(f"n must be at least 1, got {n}")
    drawn: Counter[str] = Counter()
    drawn_levels: Counter[int] = Counter()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        with (tmp / "data.jsonl").open("w", encoding="utf-8") as f:
            for index in tqdm(range(n), desc="synth", unit="sample", disable=not progress):
                family, level, sample, image = make_sample(index, seed, image_size, names, level_set)
                image.save(tmp / sample.images[0], format="PNG")
                f.write(json.dumps(sample.to_row(), ensure_ascii=False) + "\n")
                drawn[family] += 1
                drawn_levels[level] += 1
        meta = {
            "n": n,
            "seed": seed,
            "image_size": image_size,
            "families": {name: drawn[name] for name in names},
            "levels": {str(level): drawn_levels[level] for level in level_set},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return Path(out_dir) / "data.jsonl"
