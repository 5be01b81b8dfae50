"""A question's reference samples, scored: how many are right (by the training reward's answer check),
their complexity, format rate and truncations, and the level they put the question on
(docs/algorithms.md, "NeuraLadder")."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from observe_r1.answer import accuracy
from observe_r1.data import is_url
from observe_r1.format import DEFAULT_VARIANT, parse
from observe_r1_train.ladder import curriculum
from observe_r1_train.ladder.inputs import Row
from observe_r1_train.ladder.samplers import Response


@dataclass
class Scored:
    """A question's K samples, scored: `index` is its position among the rows read."""

    index: int
    row: Row
    correct: int
    k: int
    complexity: float
    format_rate: float
    truncated: int
    lengths: list[float] | None  # each sample's tokens, when the engine counted them one by one

    @property
    def p(self) -> float:
        return self.correct / self.k

    @property
    def difficulty(self) -> float:
        return curriculum.difficulty(self.correct, self.k)

    @property
    def level(self) -> int:
        return curriculum.level(self.correct, self.k)


def question_key(row: Row) -> str:
    """What the model sees: the question text and each image's bytes (or URL)."""
    digest = hashlib.sha256(row.sample.question.encode())
    for ref in row.sample.images:
        digest.update(
            b"\x1f" + (ref.encode() if is_url(ref) else hashlib.sha256(Path(ref).read_bytes()).digest())
        )
    return digest.hexdigest()


def format_rate(responses: list[Response], variant: str = DEFAULT_VARIANT) -> float:
    """The share of responses that pass `variant`'s format check (the training reward's check)."""
    return sum(parse(r.text, variant=variant).format_ok for r in responses) / len(responses)


def score(index: int, row: Row, responses: list[Response], variant: str = DEFAULT_VARIANT) -> Scored:
    """Accuracy (the training reward's answer check), format rate in `variant` and tokens of a question's
    samples."""
    correct = sum(accuracy(r.text, row.sample) == 1.0 for r in responses)
    tokens = [r.tokens for r in responses]
    return Scored(
        index=index,
        row=row,
        correct=int(correct),
        k=len(responses),
        complexity=round(curriculum.complexity(tokens), 4),
        format_rate=format_rate(responses, variant),
        truncated=sum(r.finish == "length" for r in responses),
        lengths=[int(t) for t in tokens] if all(r.exact for r in responses) else None,
    )


def histogram(items: list[Scored], k: int) -> list[int]:
    """Questions per level 0..K (level i: difficulty i / K)."""
    counts = Counter(s.level for s in items)
    return [counts.get(i, 0) for i in range(k + 1)]
