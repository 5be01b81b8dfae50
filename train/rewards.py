"""Observe-R1 rewards (docs/algorithms.md, "Rewards"): accuracy, format and the group-level length bonus.

A reward is a plain function `(completions, samples, **ctx) -> list[float]`. Two kinds:
- per-sample (the default): called once on the whole batch; each value depends on its own response;
- per-group (marked with `@group_reward`): called once per GRPO group with that group's slices of
  `completions`, `samples` and the context lists (`lengths`, `accuracies`), because it ranks the
  responses of a group against each other.
The context keywords are `lengths` (generated tokens), `accuracies` (the built-in accuracy),
`format_variant` (the output format the run trains, `observe_r1.format.VARIANTS`), `nested_observe`,
`bonus_coef`, `bonus_min_len`, `bonus_requires_format`; a function receives only the ones it names, unless
it takes `**ctx`. A config names a component by its built-in name or as `module:function`.

Accuracy is the core's answer check (`observe_r1.answer.accuracy`), which eval and the ladder share; the
format reward is the core's format check (`observe_r1.format`). No separate tag regex lives here.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from observe_r1.answer import accuracy
from observe_r1.data import Sample
from observe_r1.errors import InvalidValue
from observe_r1.format import DEFAULT_VARIANT, parse

FORMAT_REWARD = 0.5
BONUS_COEF = 0.2
BONUS_MIN_LEN = 100  # ℓ, generated tokens
REWARD_CLAMP = 10.0  # the authors clamp the total to [-10, 10]
DEFAULT_COMPONENTS: dict[str, float] = {"accuracy": 1.0, "format": 1.0, "bonus": 1.0}


class RewardFn(Protocol):
    """`(completions, samples, **ctx) -> list[float]`, one value per completion."""

    def __call__(self, completions: list[str], samples: list[Sample], **ctx) -> list[float]: ...


def group_reward(fn: Callable) -> Callable:
    """Mark `fn` as per-group: `compute_rewards` calls it once per group with the group's slices."""
    fn.group_level = True
    return fn


def format_reward(
    completion: str, sample: Sample, nested_observe: bool = False, format_variant: str = DEFAULT_VARIANT
) -> float:
    """FORMAT_REWARD when format.py's check of `format_variant` passes, else 0 (`sample` is unused:
    uniform signature)."""
    return FORMAT_REWARD if parse(completion, nested_observe, format_variant).format_ok else 0.0


@group_reward
def bonus_reward(
    completions: list[str],
    samples: list[Sample],
    accuracies: list[float],
    lengths: list[int],
    bonus_coef: float = BONUS_COEF,
    bonus_min_len: int = BONUS_MIN_LEN,
    nested_observe: bool = False,
    bonus_requires_format: bool = True,
    format_variant: str = DEFAULT_VARIANT,
    **_,
) -> list[float]:
    """+bonus_coef for the shortest correct response of ONE group, if it has more than `bonus_min_len` tokens.

    Correct means accuracy 1 AND (ours, `bonus_requires_format`) a passing format check: otherwise dropping
    the observation and the tags would be the cheapest way to be shortest, and the bonus would pay for
    breaking the format (this also keeps the totals to 0, 0.5, 1, 1.5, 1.7). The authors' code pays a
    malformed correct response too: `bonus_requires_format=False`. If the shortest correct response has
    `bonus_min_len` tokens or fewer nobody gets the bonus (ℓ stops the model from skipping its reasoning);
    with no correct response nobody gets it (unlike the authors' code). Ties: the first in group
    order, so exactly one response is "the shortest".
    """
    out = [0.0] * len(completions)
    correct = [
        i
        for i, (c, acc) in enumerate(zip(completions, accuracies, strict=True))
        if acc >= 1.0 and (not bonus_requires_format or parse(c, nested_observe, format_variant).format_ok)
    ]
    if correct:
        best = min(correct, key=lambda i: lengths[i])
        if lengths[best] > bonus_min_len:
            out[best] = bonus_coef
    return out


def _accuracy(completions: list[str], samples: list[Sample], **_) -> list[float]:
    return [accuracy(c, s) for c, s in zip(completions, samples, strict=True)]


def _format(
    completions: list[str],
    samples: list[Sample],
    nested_observe: bool = False,
    format_variant: str = DEFAULT_VARIANT,
    **_,
) -> list[float]:
    return [
        format_reward(c, s, nested_observe, format_variant) for c, s in zip(completions, samples, strict=True)
    ]


BUILTINS: dict[str, RewardFn] = {"accuracy": _accuracy, "format": _format, "bonus": bonus_reward}


def load_reward(spec: str) -> RewardFn:
    """A built-in by name, or the callable `function` of an importable `module` for `module:function`."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InvalidValue(f"reward '{spec}': expected one of {sorted(BUILTINS)} or 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InvalidValue(f"reward '{spec}': cannot import module '{module_name}': {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise InvalidValue(f"reward '{spec}': module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise InvalidValue(f"reward '{spec}': '{attr}' is a {type(fn).__name__}, not a function")
    return fn


def _call(spec: str, fn: Callable, completions: list[str], samples: list[Sample], ctx: dict) -> list[float]:
    """Call `fn` with the context keywords it accepts and check it returns one number per completion."""
    params = inspect.signature(fn).parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        ctx = {k: v for k, v in ctx.items() if k in {p.name for p in params}}
    values = [float(v) for v in fn(completions, samples, **ctx)]
    if len(values) != len(completions):
        raise InvalidValue(
            f"reward '{spec}' returned {len(values)} values for {len(completions)} completions"
        )
    return values


@dataclass
class RewardBreakdown:
    """The weighted, clamped total per response and each component's raw (unweighted) values.

    `accuracy` is every response's 0/1 answer check, whether or not accuracy is a reward component:
    the dynamic weight and the difficulty prior read the group accuracy from it.
    """

    total: list[float]
    components: dict[str, list[float]]
    weights: dict[str, float]
    metrics: dict[str, float]
    accuracy: list[float]


def compute_rewards(
    completions: list[str],
    samples: list[Sample],
    lengths: list[int],
    group_size: int,
    components: Mapping[str, float] = DEFAULT_COMPONENTS,
    *,
    format_variant: str = DEFAULT_VARIANT,
    nested_observe: bool = False,
    bonus_coef: float = BONUS_COEF,
    bonus_min_len: int = BONUS_MIN_LEN,
    bonus_requires_format: bool = True,
    clamp: float | None = REWARD_CLAMP,
    shuffle: Sequence[str] = (),
    shuffle_seed: int = 0,
) -> RewardBreakdown:
    """Total = Σ weight · component for a batch of consecutive groups of `group_size` responses.

    `components` maps a built-in name or a `module:function` spec to its weight; every format check is
    `format_variant`'s (with `nested_observe`, observe variant only). The metrics are
    the mean of the total and of each component, plus `accuracy` and `format_rate` (shares of
    responses with a correct answer and passing the format check, rewarded or not) and, with the
    bonus on, `bonus_rate` (share of groups where someone got the bonus).

    `shuffle` (the control run, `reward.shuffle`) names components whose values enter the total
    permuted over the batch (`shuffled`); the returned components and metrics keep the true values.
    """
    n = len(completions)
    if group_size < 1 or n % group_size or len(samples) != n or len(lengths) != n:
        raise ValueError(
            f"need len(completions) = len(samples) = len(lengths), a multiple of group_size={group_size};"
            f" got {n}, {len(samples)}, {len(lengths)}"
        )
    accuracies = _accuracy(completions, samples)
    ctx = {
        "lengths": list(lengths),
        "accuracies": accuracies,
        "format_variant": format_variant,
        "nested_observe": nested_observe,
        "bonus_coef": bonus_coef,
        "bonus_min_len": bonus_min_len,
        "bonus_requires_format": bonus_requires_format,
    }
    values: dict[str, list[float]] = {}
    for spec in components:
        fn = load_reward(spec)
        if fn is _accuracy:
            values[spec] = accuracies
        elif getattr(fn, "group_level", False):
            values[spec] = []
            for start in range(0, n, group_size):
                part = slice(start, start + group_size)
                group_ctx = {k: v[part] if isinstance(v, list) else v for k, v in ctx.items()}
                values[spec] += _call(spec, fn, completions[part], samples[part], group_ctx)
        else:
            values[spec] = _call(spec, fn, completions, samples, ctx)
    scored, answer_checks = (
        shuffled(values, accuracies, shuffle, shuffle_seed) if shuffle else (values, accuracies)
    )
    total = [sum(components[s] * scored[s][i] for s in components) for i in range(n)]
    if clamp is not None:
        total = [min(max(t, -clamp), clamp) for t in total]
    metrics = {"reward/total": sum(total) / max(n, 1), "accuracy": sum(accuracies) / max(n, 1)}
    metrics |= {f"reward/{s}": sum(v) / max(n, 1) for s, v in values.items()}
    formats = (
        values["format"]
        if "format" in values
        else _format(completions, samples, nested_observe, format_variant)
    )
    metrics["format_rate"] = sum(v > 0 for v in formats) / max(n, 1)
    if "bonus" in values:
        metrics["bonus_rate"] = sum(v > 0 for v in values["bonus"]) / max(n // group_size, 1)
    return RewardBreakdown(total, values, dict(components), metrics, answer_checks)


def shuffled(
    values: Mapping[str, list[float]], accuracy: list[float], names: Sequence[str], seed: int
) -> tuple[dict[str, list[float]], list[float]]:
    """The components `names` of `values` permuted over the responses by one permutation drawn from
    `seed`, the others as they are; `accuracy` (the answer check the weights read) permuted the same way
    when "accuracy" is among `names`. Permuting every component permutes the total."""
    order = torch.randperm(len(accuracy), generator=torch.Generator().manual_seed(seed)).tolist()
    moved = {k: [v[i] for i in order] if k in names else v for k, v in values.items()}
    return moved, [accuracy[i] for i in order] if "accuracy" in names else accuracy
