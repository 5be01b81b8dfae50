"""Statistics over seeds: a Student-t confidence interval of the mean, mean curves, and a paired
bootstrap over questions for a gain over the start model.

Over n seeds with values x_1..x_n (mean m, sample standard deviation s, divided by n - 1), the
interval is

    m ± t_{(1 + c)/2, n - 1} · s / √n

with t_{q, ν} the q-quantile of Student's t with ν degrees of freedom (c = 0.95: t = 12.71 for two
seeds, 4.30 for three, 2.78 for five). The t interval, not a bootstrap: an ablation has a handful of
seeds, and a bootstrap over 3 values can only return values among their 27 resamples, which makes its
interval far too narrow. It assumes the seed-to-seed spread is roughly normal; with one seed there is
no interval.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def t_two_sided_cdf(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer `df` >= 1, in closed form (Abramowitz and Stegun
    26.7.3-4): with θ = atan(t / √df), 2θ/π for df = 1;
    (2/π)(θ + sin θ (cos θ + 2/3 cos³θ + ... + [2·4···(df-3)] / [1·3···(df-2)] cos^(df-2) θ)) for odd df;
    sin θ (1 + 1/2 cos²θ + ... + [1·3···(df-3)] / [2·4···(df-2)] cos^(df-2) θ) for even df."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    theta = math.atan(t / math.sqrt(df))
    c, s = math.cos(theta), math.sin(theta)
    if df % 2:
        if df == 1:
            return 2 * theta / math.pi
        term = total = c
        for k in range(3, df - 1, 2):  # the next term times (k - 1) / k cos²θ
            term *= (k - 1) / k * c * c
            total += term
        return 2 / math.pi * (theta + s * total)
    term = total = 1.0
    for k in range(2, df - 1, 2):  # the next term times (k - 1) / k cos²θ
        term *= (k - 1) / k * c * c
        total += term
    return s * total


def t_quantile(confidence: float, df: int) -> float:
    """t such that P(|T| < t) = `confidence` (the two-sided critical value), by bisection of the CDF."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    low, high = 0.0, 1.0
    while t_two_sided_cdf(high, df) < confidence:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if t_two_sided_cdf(mid, df) < confidence else (low, mid)
    return (low + high) / 2


@dataclass(frozen=True)
class Interval:
    """The mean of n values and its confidence interval (None for one value, or none at all)."""

    n: int
    mean: float | None
    low: float | None
    high: float | None


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """m ± t_{(1+c)/2, n-1} · s / √n over the finite values (NaNs, missing results, are left out)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return Interval(0, None, None, None)
    mean = statistics.fmean(xs)
    if len(xs) == 1:
        return Interval(1, mean, None, None)
    half = t_quantile(confidence, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return Interval(len(xs), mean, mean - half, mean + half)


def mean_curve(curves: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float, int]]:
    """(step, mean over the curves that reach that step, how many do) for every step any curve has."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            by_step.setdefault(int(step), []).append(float(value))
    return [(step, statistics.fmean(vs), len(vs)) for step, vs in sorted(by_step.items())]


def paired_bootstrap(
    diffs: Sequence[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> Interval:
    """The mean of per-question differences d_q (a cell's score minus the start model's on the same
    question) with a percentile bootstrap interval: the questions resampled with replacement
    `resamples` times, the interval the (1 - c)/2 and (1 + c)/2 quantiles of the resampled means
    (Efron and Tibshirani 1993, ch. 13). Here the questions are the unit (hundreds of them), not the
    seeds, so a bootstrap is sound; pairing removes the questions' own difficulty from the spread."""
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        return Interval(0, None, None, None)
    if d.size == 1:
        return Interval(1, float(d[0]), None, None)
    picks = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    tail = (1 - confidence) / 2
    low, high = np.quantile(d[picks].mean(axis=1), [tail, 1 - tail])
    return Interval(int(d.size), float(d.mean()), float(low), float(high))


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Each value replaced by the mean of it and the `window` - 1 before it (fewer at the start): the
    curves' smoothed line, which lags by about window / 2 steps."""
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(values))]
