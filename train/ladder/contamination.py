"""Which input rows also appear in an evaluation set: the same normalised question, or the same image.

A question that the evaluation and input rows together hold more than twice (`question_max_repeats`)
is a template ("What colour is the shape?"): the image carries the item, so such a question matches
nothing by itself; one copied item is the question once in each. The 64-bit difference hash cannot
tell plain synthetic pictures apart (one shape on a blank ground: most pairs lie within 4 bits), so
data of that kind wants `image: exact`.

MathVision and WeMath are both training sources and benchmarks in the papers, so a ladder built from
them must not hold the test items. Two images are the same when their pixels are identical (`exact`)
or, with `perceptual`, also when their 64-bit difference hashes (dHash: Krawetz, "Kind of like that",
2013) differ in at most `max_distance` bits, which survives re-encoding, resizing and small edits.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

from observe_r1.data import is_url
from observe_r1_train.ladder.inputs import Row

HASH_SIDE = 8  # dHash: a (side + 1) x side grey thumbnail gives side x side = 64 bits


def normalise_question(text: str) -> str:
    """Case-folded words and numbers, single-spaced: punctuation and layout do not hide a copy."""
    return " ".join(re.sub(r"[^\w]+", " ", text.casefold()).split())


def pixel_hash(path: str) -> str:
    """SHA-256 of the RGB pixels and size: the same picture in any file format matches."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    return hashlib.sha256(f"{rgb.width}x{rgb.height}".encode() + rgb.tobytes()).hexdigest()


def difference_hash(path: str) -> int:
    """dHash: shrink to a (8 + 1) x 8 grey thumbnail; bit (r, c) is 1 when pixel c is brighter than c + 1."""
    with Image.open(path) as img:
        grey = img.convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.int16)
    bits = (pixels[:, :-1] > pixels[:, 1:]).flatten()
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


@dataclass(frozen=True)
class Match:
    """Row `index` of the input matched evaluation row `eval_id` (at `eval_location`) by `by`."""

    index: int
    by: str
    eval_id: str
    eval_location: str


class EvalIndex:
    """The evaluation rows' normalised questions and image hashes, for lookups."""

    def __init__(
        self,
        rows: list[Row],
        question: bool,
        image: str,
        max_distance: int,
        question_max_repeats: int = 2,
        inputs: list[Row] = (),
    ):
        """`rows`: the evaluation rows; `inputs`: the rows to be checked, counted for the templates."""
        self.question, self.image, self.max_distance = question, image, max_distance
        texts = [normalise_question(r.sample.question) for r in rows]
        repeats = (
            Counter(texts + [normalise_question(r.sample.question) for r in inputs])
            if question
            else Counter()
        )
        self.questions = {
            t: r for t, r in zip(texts, rows, strict=True) if 0 < repeats[t] <= question_max_repeats
        }
        self.templates = sum(n > question_max_repeats for n in repeats.values())  # questions left out
        files = [(path, r) for r in rows for path in r.sample.images if not is_url(path)]
        self.pixels = {pixel_hash(p): r for p, r in files} if image != "none" else {}
        self.dhash_rows = [r for _, r in files] if image == "perceptual" else []
        self.dhashes = np.array(
            [difference_hash(p) for p, _ in files] if image == "perceptual" else [], np.uint64
        )

    def matches(self, index: int, row: Row) -> list[Match]:
        """Every way row `index` matches the evaluation set (empty: clean)."""
        found = []
        if self.question:
            hit = self.questions.get(normalise_question(row.sample.question))
            if hit is not None:
                found.append(Match(index, "question", hit.sample.id, hit.location))
        for path in [p for p in row.sample.images if not is_url(p)] if self.image != "none" else []:
            hit = self.pixels.get(pixel_hash(path))
            if hit is not None:
                found.append(Match(index, "image (same pixels)", hit.sample.id, hit.location))
            elif len(self.dhashes):
                distances = np.bitwise_count(self.dhashes ^ np.uint64(difference_hash(path)))
                nearest = int(distances.argmin())
                if distances[nearest] <= self.max_distance:
                    hit = self.dhash_rows[nearest]
                    by = f"image (perceptual, {int(distances[nearest])} bits apart)"
                    found.append(Match(index, by, hit.sample.id, hit.location))
        return found
