"""The answer check: is a response's answer equivalent to the gold answer?

Part of the format contract: the training reward, the local eval tasks and the ladder's difficulty
estimate all score with `accuracy`, so a number means the same in each. The answer text is
`format.parse(completion).graded_answer`: the first `<answer>` block's own text (an unclosed block runs
to the end, which covers the authors' fallback of the text after the last `<answer>`), or, in a response
without any `<answer>` block, the text outside every block. Text beside an `<answer>` block never
counts, so a second guess after the block cannot win.

Cost: math-verify (sympy) takes about 10 ms per check once warm (the first call in a process, ~150 ms);
a thread pool does not help under the GIL.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, verify
from math_verify import parse as math_parse
from math_verify.errors import TimeoutException

from observe_r1.data import Sample
from observe_r1.format import parse

MATH_TIMEOUT_S = 3  # per math-verify parse/verify call, main thread only (signal.alarm)
_MATH_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
_WRAPPED = re.compile(
    r"\*\*([^*]+)\*\*|\*([^*]+)\*|\$([^$]+)\$|`([^`]+)`|\\(?:boxed|text|textbf|mathrm)\{([^{}]+)\}"
)
_LABEL = re.compile(r"^(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)(?:\s+is)?\s*:?\s*")
_LETTER = re.compile(r"\(?([a-z])\)?[.):]?(?:\s+(.+))?")
_PROSE_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")
_TEXT_ANSWER = re.compile(r"[^\W\d_]+(?:[\s'-]+[^\W\d_]+)*")


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


def accuracy(completion: str, sample: Sample) -> float:
    """1.0 when the answer text is equivalent to `sample.answer`, else 0.0.

    Multiple choice (the sample has `choices`, or its gold is one capital letter): the option letter
    from `_mc_letter` must equal the gold's, strictly (ours, docs/algorithms.md). Since that needs the whole
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
    pred, gold = parse(completion).graded_answer, sample.answer.strip()
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


def unverifiable_reason(sample: Sample, max_words: int) -> str | None:
    """Why `accuracy` cannot verify answers against `sample.answer`, or None when it can.

    The ladder drops such rows before sampling, as [OR1] dropped items with unverifiable answers: a
    difficulty measured against a gold no response can match would read as "hard". A multiple-choice
    gold must name one option of the row; an open gold must be either a short answer in words (at
    most `max_words`, since words are compared exactly) or something math-verify reads; and the check
    must accept the gold itself as a response.
    """
    gold = sample.answer.strip()
    if sample.choices or re.fullmatch(r"[A-Z]", gold):
        letter = _mc_letter(gold, sample.choices)
        if letter is None:
            return "multiple-choice gold names no single option"
        if sample.choices and ord(letter) - 65 >= len(sample.choices):
            return f"gold names option {letter}, but the row has {len(sample.choices)} choices"
    elif _TEXT_ANSWER.fullmatch(_normalise(gold)):
        words = len(_normalise(gold).split())
        if words > max_words:
            return f"free-form gold of more than {max_words} words (words are compared exactly)"
    elif all(isinstance(found, str) for found in _math_parse(gold, _timeout())):
        return "math-verify cannot read the gold"  # only its raw-string fallback, no expression
    if accuracy(f"<answer>{gold}</answer>", sample) != 1.0:
        return "the answer check does not accept the gold itself"
    return None
