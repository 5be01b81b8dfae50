"""The ladder's math, pure functions on plain numbers (docs/algorithms.md, "NeuraLadder", "Difficulty prior").

With K reasoning samples per question of which `correct` are right:
- p = correct / K; difficulty d = 1 - p [OR1]; the level is the integer K - correct, so level / K = d
  (nine levels 0..8 for K = 8); complexity = mean generated tokens of the K samples [OR1];
- U-shape filter [DP]: keep p_low < p < p_high;
- order [OR1]: difficulty ascending, then complexity ascending (ties: input order);
- low-complexity drop [OR1]: of the difficulty-0 items, the least complex `share` (ours);
- smoothing [OR1]: each level's stretch of the ladder holds its own items and some of its neighbours'
  (`smooth`);
- stages [DP]: stage 2 when d >= threshold, else stage 1.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

_EPS = 1e-9  # guards floor() against float error: (1 - 0.6) * 10 is 3.9999999999999996


def difficulty(correct: int, k: int) -> float:
    """d = 1 - correct / K [OR1]."""
    if not 0 <= correct <= k or k < 1:
        raise ValueError(f"need 0 <= correct <= K and K >= 1, got correct={correct}, K={k}")
    return 1.0 - correct / k


def level(correct: int, k: int) -> int:
    """The level index K - correct: 0 when every sample is right, K when none is (d = level / K)."""
    difficulty(correct, k)  # the same range check
    return k - correct


def complexity(lengths: Sequence[float]) -> float:
    """Mean generated tokens of a question's samples [OR1]."""
    if not lengths:
        raise ValueError("complexity needs at least one sample")
    return sum(lengths) / len(lengths)


def u_filter_keeps(p: float, p_low: float, p_high: float) -> bool:
    """[DP]'s offline filter: keep p_low < p < p_high (defaults 0 and 1 drop the always-wrong and the
    always-right questions, the two ends of the U-shaped histogram of p)."""
    return p_low < p < p_high


def ladder_order(difficulties: Sequence[float], complexities: Sequence[float]) -> list[int]:
    """Indices in NeuraLadder order: difficulty ascending, then complexity ascending [OR1]; equal items
    keep their input order, so the order is a function of the rows alone."""
    return sorted(range(len(difficulties)), key=lambda i: (difficulties[i], complexities[i], i))


def easy_drop(difficulties: Sequence[float], complexities: Sequence[float], share: float) -> list[int]:
    """Indices to drop: floor(share x n0) of the n0 items at difficulty 0, least complex first (ties:
    input order). [OR1] drops low-complexity items at difficulty 0 without publishing the cut-off."""
    easy = [i for i, d in enumerate(difficulties) if d == 0]
    count = math.floor(share * len(easy) + _EPS)
    return sorted(sorted(easy, key=lambda i: (complexities[i], i))[:count])


def stage(d: float, threshold: float) -> int:
    """[DP]'s two stages: 2 (harder, trained with the difficulty hint) when d >= threshold, else 1."""
    return 2 if d >= threshold else 1


@dataclass(frozen=True)
class Smoothing:
    """`order`: input positions in their smoothed order (a permutation); `segments[j]`: the level whose
    stretch output position j lies in; `mix[segment][level]`: how many items of `level` that stretch holds."""

    order: list[int]
    segments: list[int]
    mix: dict[int, dict[int, int]]


def _split(total: int, neighbours: list[int], home: int) -> dict[int, int]:
    """`total` split evenly over `neighbours`; the remainder goes to the nearest first (then the lower)."""
    if not neighbours:
        return {}
    ranked = sorted(neighbours, key=lambda b: (abs(b - home), b))
    base, extra = divmod(total, len(ranked))
    return {b: base + (rank < extra) for rank, b in enumerate(ranked)}


def smooth(levels: Sequence[int], width: int, self_share: float, seed: int) -> Smoothing:
    """Mix each level's stretch of an ordered ladder with its neighbours' items [OR1] (ours, exactly):

    Level a (n_a items) would send e_a = floor((1 - s) n_a) of its items away, split evenly over the
    non-empty levels b with 0 < |a - b| <= width. Two levels a, b then swap x_ab = min(e_a->b, e_b->a)
    items, drawn at random (seeded): x_ab items of a move into b's stretch and x_ab of b into a's. Every
    stretch keeps its size, every item appears once, and a level's own items fill at least a share s
    of its stretch (more where its neighbours are smaller). In a stretch the incoming items take random
    positions; the stretch's own items and the incoming ones each keep their ladder order.

    `levels` are the items' levels in ladder order (non-decreasing). width 0 or s = 1: no change.
    """
    if any(a > b for a, b in zip(levels, levels[1:], strict=False)):
        raise ValueError("smooth needs the levels in ladder order (non-decreasing)")
    if width < 0 or not 0 <= self_share <= 1:
        raise ValueError(f"need width >= 0 and 0 <= self_share <= 1, got {width}, {self_share}")
    members: dict[int, list[int]] = {}
    for position, lv in enumerate(levels):
        members.setdefault(lv, []).append(position)
    present = sorted(members)
    wishes = {}
    for a in present:
        neighbours = [b for b in present if 0 < abs(a - b) <= width]
        send = math.floor((1 - self_share) * len(members[a]) + _EPS)
        wishes[a] = _split(send, neighbours, a)
    rng = random.Random(seed)
    staying = {a: list(members[a]) for a in present}
    incoming: dict[int, list[int]] = {a: [] for a in present}
    for a in present:
        for b in sorted(wishes[a]):
            if b <= a:
                continue
            swap = min(wishes[a][b], wishes[b][a])
            if swap == 0:
                continue
            from_a, from_b = rng.sample(staying[a], swap), rng.sample(staying[b], swap)
            staying[a] = [p for p in staying[a] if p not in set(from_a)]
            staying[b] = [p for p in staying[b] if p not in set(from_b)]
            incoming[b] += from_a
            incoming[a] += from_b
    order: list[int] = []
    segments: list[int] = []
    mix: dict[int, dict[int, int]] = {}
    for a in present:
        slots = len(members[a])
        movers = sorted(incoming[a])
        mover_slots = set(rng.sample(range(slots), len(movers)))
        own, others = iter(staying[a]), iter(movers)
        stretch = [next(others) if j in mover_slots else next(own) for j in range(slots)]
        order += stretch
        segments += [a] * slots
        counts: dict[int, int] = {}
        for position in stretch:
            counts[levels[position]] = counts.get(levels[position], 0) + 1
        mix[a] = dict(sorted(counts.items()))
    return Smoothing(order, segments, mix)
