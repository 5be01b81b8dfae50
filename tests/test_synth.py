"""The synthetic data: loadable, deterministic, evenly mixed, and with answers the pixels confirm."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from functools import cache

import numpy as np
import pytest

from observe_r1 import synth
from observe_r1.data import load_samples
from observe_r1.synth import draw as synth_draw

SIZE = 224
SEEDS = range(8)


def _mask(image, color) -> np.ndarray:
    return (np.asarray(image) == np.array(color, dtype=np.uint8)).all(axis=-1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each cropped to its bounding box."""
    todo = {tuple(p) for p in np.argwhere(mask)}
    crops = []
    while todo:
        stack = [todo.pop()]
        pixels = list(stack)
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if (y + dy, x + dx) in todo:
                        todo.remove((y + dy, x + dx))
                        stack.append((y + dy, x + dx))
                        pixels.append((y + dy, x + dx))
        ys, xs = np.array(pixels).T
        crop = np.zeros((ys.max() - ys.min() + 1, xs.max() - xs.min() + 1), dtype=bool)
        crop[ys - ys.min(), xs - xs.min()] = True
        crops.append(crop)
    return crops


def _shape_of(crop: np.ndarray) -> str:
    fill = crop.mean()
    return "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"


def _option(answer: str, choices: list[str]) -> str:
    assert re.fullmatch(r"[A-Z]", answer) and ord(answer) - 65 < len(choices)
    return choices[ord(answer) - 65]


@cache
def _glyphs(size: int) -> dict[tuple[int, int], list[tuple[int, np.ndarray]]]:
    """Each digit rendered alone at `size`, keyed by its bitmap's shape for a quick lookup."""
    by_shape: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    for digit in range(10):
        image, draw = synth_draw.canvas(size * 3)
        draw.text(
            (size * 3 // 2, size * 3 // 2),
            str(digit),
            fill=synth.INK,
            font=synth_draw.font(size),
            anchor="mm",
        )
        (crop,) = _components(_mask(image, synth.INK))
        by_shape.setdefault(crop.shape, []).append((digit, crop))
    return by_shape


def _read_digit(crop: np.ndarray) -> int:
    """Exact template match: glyphs are drawn without anti-aliasing at integer positions."""
    found = {d for size in range(8, 80) for d, g in _glyphs(size).get(crop.shape, []) if (g == crop).all()}
    assert len(found) == 1, f"unreadable glyph {crop.shape}: {found}"
    return found.pop()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    return synth.generate(out, 40, seed=3, image_size=SIZE, progress=False, families="all")


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_output_loads_with_the_project_loader_and_datasets(dataset, tmp_path):
    import datasets

    samples = load_samples(dataset)
    assert len(samples) == 40 and len({s.id for s in samples}) == 40
    table = datasets.load_dataset("json", data_files=str(dataset), split="train", cache_dir=str(tmp_path))
    assert table.num_rows == 40
    for row in _rows(dataset):
        assert "difficulty" not in row and "complexity" not in row
        assert re.fullmatch(r"synth-\d{6}", row["id"]) and row["images"] == [f"images/{row['id'][6:]}.png"]
    from PIL import Image

    with Image.open(samples[0].images[0]) as image:
        assert image.mode == "RGB" and image.size == (SIZE, SIZE)


def test_meta_counts_families_and_levels(dataset):
    meta = json.loads((dataset.parent / "meta.json").read_text())
    rows = _rows(dataset)
    assert (meta["n"], meta["seed"], meta["image_size"]) == (40, 3, SIZE)
    assert meta["families"] == {f: sum(r["source"] == f"synth/{f}" for r in rows) for f in synth.FAMILIES}
    assert meta["levels"] == {str(lv): sum(r["level"] == lv for r in rows) for lv in synth.LEVELS}


def test_every_family_and_level_appears_and_answers_have_their_stated_form(dataset):
    rows = _rows(dataset)
    assert {r["source"] for r in rows} == {f"synth/{f}" for f in synth.FAMILIES}
    assert len(synth.FAMILIES) >= 4 and {r["level"] for r in rows} == set(synth.LEVELS)
    assert len(Counter((r["source"], r["level"]) for r in rows)) == 5 * len(synth.FAMILIES) == 40
    kinds = Counter()
    for row in rows:
        if "choices" in row:
            kinds["mc"] += 1
            option = _option(row["answer"], row["choices"])
            assert f"{row['answer']}. {option}" in row["question"] and synth.LETTER_HINT in row["question"]
        elif row["source"].removeprefix("synth/") in synth.PERCEPTION_FAMILIES:
            kinds["word"] += 1
            assert re.fullmatch(r"[a-z]+", row["answer"]) and "Answer" in row["question"]
        else:
            kinds["numeric"] += 1
            assert re.fullmatch(r"\d+", row["answer"]) and synth.NUMBER_HINT in row["question"]
    assert kinds["mc"] and kinds["numeric"] and kinds["word"]


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_and_another_seed_differs(tmp_path):
    a = synth.generate(tmp_path / "a", 12, seed=5, image_size=96, progress=False)
    b = synth.generate(tmp_path / "b", 12, seed=5, image_size=96, progress=False)
    c = synth.generate(tmp_path / "c", 12, seed=6, image_size=96, progress=False)
    assert _tree(a.parent) == _tree(b.parent)
    assert a.read_bytes() != c.read_bytes()


def test_a_longer_run_extends_a_shorter_one(tmp_path):
    short = synth.generate(tmp_path / "short", 7, seed=1, image_size=96, progress=False)
    long = synth.generate(tmp_path / "long", 12, seed=1, image_size=96, progress=False)
    assert long.read_text().splitlines()[:7] == short.read_text().splitlines()
    short_images = _tree(short.parent / "images")
    assert {k: v for k, v in _tree(long.parent / "images").items() if k in short_images} == short_images


def test_existing_output_is_refused_without_overwrite_and_replaced_with_it(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        synth.generate(out, 3, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    synth.generate(out, 3, image_size=64, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["data.jsonl", "images", "meta.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


@pytest.mark.parametrize("size", [63, 1025])
def test_image_size_out_of_range_is_rejected(tmp_path, size):
    with pytest.raises(ValueError, match="image_size"):
        synth.generate(tmp_path / "data", 3, image_size=size, progress=False)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("size", [synth.MIN_IMAGE_SIZE, synth.MAX_IMAGE_SIZE])
def test_every_family_and_level_draws_at_the_size_limits(size):
    for make in synth.FAMILIES.values():
        for level in synth.LEVELS:
            image, question, answer, choices = make(random.Random(level), level, size)
            assert image.size == (size, size) and image.mode == "RGB" and question and answer


def _cases(family: str):
    for level in synth.LEVELS:
        for seed in SEEDS:
            yield level, synth.FAMILIES[family](random.Random(seed), level, SIZE)


def test_count_answers_match_the_objects_in_the_image():
    for level, (image, question, answer, choices) in _cases("count"):
        color, noun = re.match(r"How many (\w+) (\w+)s are", question).groups()
        crops = _components(_mask(image, synth.PALETTE[color]))
        wanted = [c for c in crops if noun == "shape" or _shape_of(c) == noun]
        assert choices is None and int(answer) == len(wanted) >= 1, (level, question)


def test_compare_count_answers_match_the_objects_in_the_image():
    for level, (image, question, answer, choices) in _cases("compare_count"):
        a, b = re.match(r"Are there more (\w+) shapes or more (\w+) shapes", question).groups()
        n_a, n_b = (len(_components(_mask(image, synth.PALETTE[c]))) for c in (a, b))
        expected = f"more {a}" if n_a > n_b else f"more {b}" if n_b > n_a else "the same number"
        assert _option(answer, choices) == expected, (level, question, n_a, n_b)


def test_bar_compare_answers_name_the_extreme_bar_by_measured_height():
    for level, (image, question, answer, choices) in _cases("bar_compare"):
        heights = {c: int(_mask(image, synth.PALETTE[c]).any(axis=1).sum()) for c in choices}
        assert len(heights) == level + 1 and all(heights.values())
        ranked = sorted(heights, key=heights.get, reverse="tallest" in question)
        assert heights[ranked[0]] != heights[ranked[1]]
        assert _option(answer, choices) == ranked[0], (level, question, heights)


def test_bar_margins_shrink_with_level():
    margins = {}
    for level, (image, question, _, choices) in _cases("bar_compare"):
        heights = sorted(int(_mask(image, synth.PALETTE[c]).any(axis=1).sum()) for c in choices)
        margins.setdefault(level, []).append(
            heights[-1] - heights[-2] if "tallest" in question else heights[1] - heights[0]
        )
    means = [np.mean(margins[level]) for level in synth.LEVELS]
    assert means == sorted(means, reverse=True) and means[-1] < means[0] / 5


def test_digit_sum_answers_match_the_digits_read_from_the_image():
    for level, (image, question, answer, choices) in _cases("digit_sum"):
        color = re.match(r"What is the sum of the (\w+) digits", question)
        if color:
            mask = _mask(image, synth.PALETTE[color.group(1)])
        else:
            mask = ~_mask(image, synth.BACKGROUND)
        digits = [_read_digit(crop) for crop in _components(mask)]
        assert choices is None and int(answer) == sum(digits) and len(digits) >= 2, (level, question, digits)


def _hands_match(image, hour: int, minute: int) -> bool:
    """Each hand, in its own colour, covers a point along its own angle (0.62 of the radius is past the hour hand)."""
    pixels = np.asarray(image)
    centre, radius = SIZE / 2, SIZE * 0.45

    def hand_at(color, fraction: float, turns: float) -> bool:
        x, y = (round(v) for v in synth_draw.hand_end(centre, radius, fraction, turns))
        return bool(_mask(pixels[y - 1 : y + 2, x - 1 : x + 2], color).any())

    hour_turns = ((hour % 12) + minute / 60) / 12
    return hand_at(synth.MINUTE_HAND, 0.62, minute / 60) and hand_at(synth.HOUR_HAND, 0.3, hour_turns)


def test_clock_answers_match_the_hands_and_no_distractor_does():
    for level, (image, _, answer, choices) in _cases("clock"):
        if choices is None:
            assert _hands_match(image, int(answer), 0), (level, answer)
            assert not any(_hands_match(image, h, 0) for h in range(1, 13) if h != int(answer))
            continue
        correct = _option(answer, choices)
        assert len(set(choices)) == len(choices) == (4 if level < 5 else 5)
        for option in choices:
            assert _hands_match(image, *map(int, option.split(":"))) == (option == correct), (
                level,
                option,
                correct,
            )


def _coloured(image) -> dict[str, np.ndarray]:
    """Each palette colour present in the image (gray and the background left out) with its mask."""
    masks = {name: _mask(image, rgb) for name, rgb in synth.PALETTE.items() if name != "gray"}
    return {name: m for name, m in masks.items() if m.any()}


def test_colour_answers_name_the_one_coloured_shape():
    sizes = {}
    for level, (image, question, answer, choices) in _cases("colour"):
        coloured = _coloured(image)
        assert choices is None and list(coloured) == [answer], (level, question)
        assert len(_components(coloured[answer])) == 1
        gray = len(_components(_mask(image, synth.PALETTE["gray"])))
        assert ("not gray" in question) == (gray > 0)
        sizes.setdefault(level, []).append(int(coloured[answer].sum()))
    means = [np.mean(sizes[level]) for level in synth.LEVELS]
    assert means == sorted(means, reverse=True)  # smaller targets at higher levels


def test_side_answers_match_where_the_named_shape_lies():
    gaps = {}
    for level, (image, question, answer, choices) in _cases("side"):
        colour = re.match(r"Is the (\w+) shape in the left", question).group(1)
        xs = np.argwhere(_mask(image, synth.PALETTE[colour]))[:, 1]
        middle = SIZE / 2
        assert choices is None and answer == ("left" if xs.max() < middle else "right"), (level, question)
        assert xs.max() < middle or xs.min() >= middle  # wholly in one half
        gaps.setdefault(level, []).append(min(abs(xs.max() - middle), abs(xs.min() - middle)))
    means = [np.mean(gaps[level]) for level in synth.LEVELS]
    assert means[0] > means[2] > means[4]  # nearer the middle line at higher levels


def test_larger_answers_match_the_measured_areas():
    ratios = {}
    for level, (image, question, answer, choices) in _cases("larger"):
        a, b = re.match(r"Which shape is larger, the (\w+) one or the (\w+) one", question).groups()
        area = {c: int(_mask(image, synth.PALETTE[c]).sum()) for c in (a, b)}
        assert choices is None and answer in (a, b) and area[answer] > area[b if answer == a else a], (
            level,
            area,
        )
        ratios.setdefault(level, []).append(area[answer] / min(area.values()))
    means = [np.mean(ratios[level]) for level in synth.LEVELS]
    assert means == sorted(means, reverse=True) and means[-1] < 1.5  # closer sizes at higher levels


def test_families_are_chosen_by_preset_or_name_and_the_default_is_unchanged(tmp_path):
    perception = load_samples(synth.generate(tmp_path / "p", 15, families="perception", progress=False))
    assert [s.source for s in perception[:3]] == ["synth/colour", "synth/side", "synth/larger"]
    assert {(s.source, s.level) for s in perception} == {
        (f"synth/{f}", lv) for f in synth.PERCEPTION_FAMILIES for lv in synth.LEVELS
    }
    mixed = load_samples(synth.generate(tmp_path / "m", 4, families="clock,colour", progress=False))
    assert [s.source for s in mixed] == ["synth/clock", "synth/colour"] * 2
    default = load_samples(synth.generate(tmp_path / "d", 5, progress=False))
    assert [s.source for s in default] == [f"synth/{f}" for f in synth.REASONING_FAMILIES]
    for bad in ("colour,colour", "nope", ""):
        with pytest.raises(ValueError, match="families"):
            synth.generate(tmp_path / "bad", 3, families=bad, progress=False)
    assert not (tmp_path / "bad").exists()


def test_levels_are_chosen_and_cover_every_family(tmp_path):
    rows = load_samples(
        synth.generate(tmp_path / "l", 12, families="perception", levels="1,2", progress=False)
    )
    assert {(s.source, s.level) for s in rows} == {
        (f"synth/{f}", lv) for f in synth.PERCEPTION_FAMILIES for lv in (1, 2)
    }
    meta = json.loads((tmp_path / "l" / "meta.json").read_text())
    assert meta["levels"] == {"1": 6, "2": 6}
    for bad in ("0,1", "1,1", "x", ""):
        with pytest.raises(ValueError, match="levels"):
            synth.generate(tmp_path / "bad", 3, levels=bad, progress=False)
