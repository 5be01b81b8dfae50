"""Observe-R1 rewards (REFERENCE.md, "Rewards"): accuracy, format and the group-level length bonus.

A reward is a plain function `(completions, samples, **ctx) -> list[float]` (DESIGN.md). Two kinds:
- per-sample (the default): called once on the whole batch; each value depends on its own response;
- per-group (marked with `@group_reward`): called once per GRPO group with that group's slices of
  `completions`, `samples` and the context lists (`lengths`, `accuracies`), because it ranks the
  responses of a group against each other.
The context keywords are `lengths` (generated tokens), `accuracies` (the built-in accuracy),
`nested_observe`, `bonus_coef`, `bonus_min_len`, `bonus_requires_format`; a function receives only the ones it names, unless
it takes `**ctx`. A config names a component by its built-in name or as `module:function`.

The answer text is `format.parse(completion).answer`: the `<answer>` block, or, in a response without
one, the text outside every block (format.py routes it there, which also covers the authors'
fallback of the text after the last `<answer>`). No separate tag regex lives here.

Cost: math-verify (sympy) takes about 10 ms per accuracy check once warm (the first call in a process,
~150 ms); a thread pool does not help under the GIL, so the batch is scored sequentially.
"""

from __future__ import annotations

import importlib
import inspect
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from math_verify import ExprExtractionConfig, LatexExtractionConfig, verify
from math_verify import parse as math_parse
from math_verify.errors import TimeoutException

from observe_r1.data import Sample
from observe_r1.errors import UserError
from observe_r1.format import parse

FORMAT_REWARD = 0.5
BONUS_COEF = 0.2
BONUS_MIN_LEN = 100  # ℓ, generated tokens
REWARD_CLAMP = 10.0  # the authors clamp the total to [-10, 10]
MATH_TIMEOUT_S = 3  # per math-verify parse/verify call, main thread only (signal.alarm)
DEFAULT_COMPONENTS: dict[str, float] = {"accuracy": 1.0, "format": 1.0, "bonus": 1.0}

_MATH_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
_WRAPPED = re.compile(
    r"\*\*([^*]+)\*\*|\*([^*]+)\*|\$([^$]+)\$|`([^`]+)`|\\(?:boxed|text|textbf|mathrm)\{([^{}]+)\}"
)
_LABEL = re.compile(r"^(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)(?:\s+is)?\s*:?\s*")
_LETTER = re.compile(r"\(?([a-z])\)?[.):]?(?:\s+(.+))?")
_PROSE_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")
_TEXT_ANSWER = re.compile(r"[^\W\d_]+(?:[\s'-]+[^\W\d_]+)*")


class RewardFn(Protocol):
    """`(completions, samples, **ctx) -> list[float]`, one value per completion."""

    def __call__(self, completions: list[str], samples: list[Sample], **ctx) -> list[float]: ...


def group_reward(fn: Callable) -> Callable:
    """Mark `fn` as per-group: `compute_rewards` calls it once per group with the group's slices."""
    fn.group_level = True
    return fn


def _normalise(text: str) -> str:
    """Case-folded, single-spaced text without a trailing period or wrapping `**`, `$`, `\\boxed{}`…"""
    text = " ".join(text.split()).casefold()
    while True:
        text = text.strip().rstrip(".").strip()
        m = _WRAPPED.fullmatch(text)
        if m is None:
            return text
        text = next(g for g in m.groups() if g is not None)


def _option_key(text: str) -> str:
    """Option text for comparison: case-folded, punctuation turned into single spaces."""
    return " ".join(re.sub(r"[^\w]+", " ", text.casefold()).split())


def _mc_letter(text: str, choices: Sequence[str] | None) -> str | None:
    """The option letter `text` names, or None. The whole text must be ONE of these (any case):

    - the option text of exactly one choice ("blue", "Blue." when a choice is "blue"; a choice's own
      leading label such as "B. blue" is ignored);
    - a letter, optionally in parentheses and followed by `.`, `)` or `:` ("B", "(B)", "B.", "B)");
    - the same after "answer", "option", "choice", "the (correct|final) answer is", with or without
      a colon ("Answer: B", "option B", "The answer is (B)");
    - a letter form followed by that same option's text ("B. blue");
    each possibly wrapped in `**…**`, `*…*`, `$…$`, backticks, `\\boxed{}` or `\\text{}`.
    Never a substring: "the" does not name E, "BAD" does not name B, "A or B" names nothing.
    """
    norm = _normalise(text)
    keys = [
        _option_key(re.sub(rf"^\(?{chr(97 + i)}[.):]\s*", "", c.casefold()))
        for i, c in enumerate(choices or [])
    ]
    if norm and keys.count(_option_key(norm)) == 1:
        return chr(65 + keys.index(_option_key(norm)))
    m = _LETTER.fullmatch(_normalise(_LABEL.sub("", norm, count=1)))
    if m is None:
        return None
    letter, rest = m.groups()
    index = ord(letter) - 97
    if rest is not None and (index >= len(keys) or _option_key(rest) != keys[index]):
        return None
    return letter.upper()


def _timeout() -> int | None:
    """math-verify times out with signal.alarm, which only works in the main thread; elsewhere none."""
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=4096)
def _math_parse(text: str, timeout: int | None) -> tuple:
    """math-verify's reading of `text`: a short answer is read whole as LaTeX (`$text$`), so `x+1`
    or `3\\sqrt{2}` stay one expression; prose (two or more words) or text that already has `$` or
    `\\boxed` goes to math-verify's own extraction, which picks the boxed or final expression."""
    try:
        if "$" not in text and "\\boxed" not in text and len(_PROSE_WORD.findall(text)) < 2:
            found = math_parse(f"${text}$", _MATH_CONFIG, parsing_timeout=timeout)
            if found:
                return tuple(found)
        return tuple(math_parse(text, _MATH_CONFIG, parsing_timeout=timeout))
    except (Exception, TimeoutException):
        return ()


def _math_equal(gold: str, pred: str) -> bool:
    timeout = _timeout()
    gold_parsed, pred_parsed = _math_parse(gold, timeout), _math_parse(pred, timeout)
    if not gold_parsed or not pred_parsed:
        return False
    try:
        return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=timeout))
    except (Exception, TimeoutException):
        return False


def accuracy_reward(completion: str, sample: Sample) -> float:
    """1.0 when the answer text is equivalent to `sample.answer`, else 0.0.

    Multiple choice (the sample has `choices`, or its gold is one capital letter): the option letter
    from `_mc_letter` must equal the gold's, strictly (REFERENCE "ours"). Since that needs the whole
    answer text to be one accepted form, a response without tags can still score when its plain text
    is exactly "B", but never by a letter hidden in prose.
    Otherwise: normalised exact match first (cheap; the only check when the gold is plain words such
    as "yes" or "blue", because math-verify would read a word as a product of symbols); then
    math-verify equivalence, so "0.5" = "1/2" = "\\frac{1}{2}" and "5 cm" = "5.". Percentages follow
    math-verify: "50%" matches both 0.5 and 50 (a chart's gold "50" usually means percent). Without
    an `<answer>` block, math-verify extracts the final expression from the free text, as peers do,
    so a model that has not learned the tags still gets an accuracy signal; the format reward
    separates the two.
    """
    pred, gold = parse(completion).answer, sample.answer.strip()
    if not pred:
        return 0.0
    if sample.choices or re.fullmatch(r"[A-Z]", gold):
        want = _mc_letter(gold, sample.choices)
        return float(want is not None and _mc_letter(pred, sample.choices) == want)
    if _normalise(pred) == _normalise(gold):
        return 1.0
    if _TEXT_ANSWER.fullmatch(_normalise(gold)):
        return 0.0
    return float(_math_equal(gold, pred))


def format_reward(completion: str, sample: Sample, nested_observe: bool = False) -> float:
    """FORMAT_REWARD when format.py's check passes, else 0 (`sample` is unused: uniform signature)."""
    return FORMAT_REWARD if parse(completion, nested_observe=nested_observe).format_ok else 0.0


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
        if acc >= 1.0 and (not bonus_requires_format or parse(c, nested_observe=nested_observe).format_ok)
    ]
    if correct:
        best = min(correct, key=lambda i: lengths[i])
        if lengths[best] > bonus_min_len:
            out[best] = bonus_coef
    return out


def _accuracy(completions: list[str], samples: list[Sample], **_) -> list[float]:
    return [accuracy_reward(c, s) for c, s in zip(completions, samples, strict=True)]


def _format(completions: list[str], samples: list[Sample], nested_observe: bool = False, **_) -> list[float]:
    return [format_reward(c, s, nested_observe) for c, s in zip(completions, samples, strict=True)]


BUILTINS: dict[str, RewardFn] = {"accuracy": _accuracy, "format": _format, "bonus": bonus_reward}


def load_reward(spec: str) -> RewardFn:
    """A built-in by name, or the callable `function` of an importable `module` for `module:function`."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"reward '{spec}': expected one of {sorted(BUILTINS)} or 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"reward '{spec}': cannot import module '{module_name}': {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise UserError(f"reward '{spec}': module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise UserError(f"reward '{spec}': '{attr}' is a {type(fn).__name__}, not a function")
    return fn


def _call(spec: str, fn: Callable, completions: list[str], samples: list[Sample], ctx: dict) -> list[float]:
    """Call `fn` with the context keywords it accepts and check it returns one number per completion."""
    params = inspect.signature(fn).parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        ctx = {k: v for k, v in ctx.items() if k in {p.name for p in params}}
    values = [float(v) for v in fn(completions, samples, **ctx)]
    if len(values) != len(completions):
        raise UserError(f"reward '{spec}' returned {len(values)} values for {len(completions)} completions")
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
    nested_observe: bool = False,
    bonus_coef: float = BONUS_COEF,
    bonus_min_len: int = BONUS_MIN_LEN,
    bonus_requires_format: bool = True,
    clamp: float | None = REWARD_CLAMP,
) -> RewardBreakdown:
    """Total = Σ weight · component for a batch of consecutive groups of `group_size` responses.

    `components` maps a built-in name or a `module:function` spec to its weight. The metrics are
    the mean of the total and of each component, plus `accuracy` and `format_rate` (shares of
    responses with a correct answer and passing the format check, rewarded or not) and, with the
    bonus on, `bonus_rate` (share of groups where someone got the bonus).
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
    total = [sum(components[s] * values[s][i] for s in components) for i in range(n)]
    if clamp is not None:
        total = [min(max(t, -clamp), clamp) for t in total]
    metrics = {"reward/total": sum(total) / max(n, 1), "accuracy": sum(accuracies) / max(n, 1)}
    metrics |= {f"reward/{s}": sum(v) / max(n, 1) for s, v in values.items()}
    formats = values["format"] if "format" in values else _format(completions, samples, nested_observe)
    metrics["format_rate"] = sum(v > 0 for v in formats) / max(n, 1)
    if "bonus" in values:
        metrics["bonus_rate"] = sum(v > 0 for v in values["bonus"]) / max(n // group_size, 1)
    return RewardBreakdown(total, values, dict(components), metrics, accuracies)
