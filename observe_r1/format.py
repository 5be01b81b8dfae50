"""The Observe-R1 output format: `<observe>…</observe><think>…</think><answer>…</answer>`.

This module is the single definition of the format (docs/architecture.md): the system prompt that asks for it,
the parser that splits a response into observation, reasoning and answer, the format check used by
the format reward (docs/algorithms.md, "Output format"), and the incremental parser the server streams with.

Variants (`FormatVariant`, `VARIANTS`), so that the observe block can be ablated:
- `observe` (the default): `<observe>…</observe><think>…</think><answer>…</answer>`;
- `think`: `<think>…</think><answer>…</answer>` only, the plain R1 format.
A variant fixes the blocks and their order, its system prompt, and what the check accepts; routing is the
same for every variant, so a `think` answer parses to an empty observation, and an observe block a `think`
model writes anyway still reaches the observation field (and fails the check).

One state machine does all of it. `parse(text)` is `StreamParser` fed the whole text at once, so a
stream split anywhere (even inside a tag) ends in exactly the result of `parse` on the joined text.

Routing (the same in strict and nested mode; only the verdict differs):
- text inside `<observe>` goes to `observation`, inside `<think>` to `reasoning`, inside `<answer>` to
  `answer`; the innermost open block wins, so an observe block nested in think is an observation;
- text outside every block goes to `answer`, so a model that ignores the format (or a stock model
  answering in plain text) still reaches the client in full;
- each block's text is stripped; several blocks of one field are joined by a newline.

Verdict (format_ok):
- strict (default, ours): exactly one of each of the variant's tags (six for `observe`, four for `think`)
  in the variant's order, no tag of a block the variant lacks, each block non-empty, nothing but
  whitespace between or around the blocks;
- nested (`nested_observe=True`, `observe` variant only; the authors' regex also accepts it): the strict
  form, or `<think>…<observe>…</observe>…</think><answer>…</answer>` with all three parts non-empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from observe_r1.errors import InvalidValue

FIELDS = ("observation", "reasoning", "answer")
TAG_FIELD = {"observe": "observation", "think": "reasoning", "answer": "answer"}
OPEN_TAGS = {f"<{name}>": name for name in TAG_FIELD}
CLOSE_TAGS = {f"</{name}>": name for name in TAG_FIELD}
ALL_TAGS = (*OPEN_TAGS, *CLOSE_TAGS)
_LONGEST_TAG = max(map(len, ALL_TAGS))
SEGMENT_SEPARATOR = "\n"

STRICT_ORDER = ("<observe>", "</observe>", "<think>", "</think>", "<answer>", "</answer>")
NESTED_ORDER = ("<think>", "<observe>", "</observe>", "</think>", "<answer>", "</answer>")

SYSTEM_PROMPT = (
    "You are a careful visual reasoning assistant. First look at the image and write what you observe "
    "inside <observe> </observe> tags: the objects, numbers, text and relations that matter for the "
    "question. Then reason step by step inside <think> </think> tags, using what you observed. Finally "
    "write only the final answer inside <answer> </answer> tags: a number, a short expression, or the "
    "option letter for a multiple-choice question, with no explanation. The output format must be: "
    "<observe> ... </observe> <think> ... </think> <answer> ... </answer>"
)
THINK_SYSTEM_PROMPT = (
    "You are a careful visual reasoning assistant. Look at the image and reason step by step inside "
    "<think> </think> tags about the objects, numbers, text and relations that matter for the question. "
    "Then write only the final answer inside <answer> </answer> tags: a number, a short expression, or the "
    "option letter for a multiple-choice question, with no explanation. The output format must be: "
    "<think> ... </think> <answer> ... </answer>"
)


@dataclass(frozen=True)
class Variant:
    """One output format: its blocks in order, the prompt that asks for them, and the nested tag order
    the check may also accept (None: the variant has no observe block to nest)."""

    blocks: tuple[str, ...]
    system_prompt: str
    nested_order: tuple[str, ...] | None = None

    @property
    def order(self) -> tuple[str, ...]:
        """The tags of a well-formed response, in order."""
        return tuple(tag for name in self.blocks for tag in (f"<{name}>", f"</{name}>"))


VARIANTS: dict[str, Variant] = {
    "observe": Variant(("observe", "think", "answer"), SYSTEM_PROMPT, NESTED_ORDER),
    "think": Variant(("think", "answer"), THINK_SYSTEM_PROMPT),
}
FormatVariant = Literal[tuple(VARIANTS)]  # the choices of every `format.variant` / `--format-variant`
DEFAULT_VARIANT = "observe"


def nested_observe_problem(
    variant: str, nested_observe: bool, names: tuple[str, str] = ("nested_observe", "variant")
) -> str | None:
    """Why `variant` with `nested_observe` is refused (None: it is not), naming both options as the
    caller spells them (`names`: the nested option, the variant option): nesting the observe block
    inside think means nothing for a variant that has no observe block."""
    if variant not in VARIANTS:
        return f"{names[1]}={variant!r}: expected one of {', '.join(VARIANTS)}"
    if nested_observe and VARIANTS[variant].nested_order is None:
        return f"{names[0]} needs {names[1]}='observe' (the block it nests), not {variant!r}"
    return None


def variant_spec(
    variant: str, nested_observe: bool = False, names: tuple[str, str] = ("nested_observe", "variant")
) -> Variant:
    """The definition of `variant`; refuses an unknown name and `nested_observe` without an observe block,
    naming the options as `names` spells them (`nested_observe_problem`)."""
    problem = nested_observe_problem(variant, nested_observe, names)
    if problem is not None:
        raise InvalidValue(problem)
    return VARIANTS[variant]


def system_prompt(variant: str = DEFAULT_VARIANT, override: str | None = None) -> str | None:
    """The system prompt a config asks for: `override` None is the variant's built-in prompt, "" none
    (None), any other text itself."""
    if override is None:
        return variant_spec(variant).system_prompt
    return override or None


@dataclass(frozen=True)
class ParseResult:
    """A parsed response. `errors` says what broke the format; it is empty when `format_ok`."""

    observation: str
    reasoning: str
    answer: str
    format_ok: bool
    errors: tuple[str, ...] = ()
    # What an answer check reads: the first <answer> block's own text (an unclosed one runs to the end),
    # or `answer` when the response has no <answer> block. Never text outside the block beside one, so
    # "<answer>3</answer> 4" is graded as 3 and "<answer></answer>4" as empty.
    graded_answer: str = ""


@dataclass(frozen=True)
class Delta:
    """New text for one field, as the stream reveals it."""

    field: str
    text: str


def format_response(observation: str, reasoning: str, answer: str, variant: str = DEFAULT_VARIANT) -> str:
    """The well-formed response for the three parts (the inverse of `parse`), one block a line; a part
    whose block the variant lacks is left out (`think` drops the observation)."""
    parts = {"observe": observation, "think": reasoning, "answer": answer}
    return "\n".join(f"<{name}>{parts[name]}</{name}>" for name in variant_spec(variant).blocks)


def to_variant(text: str, variant: str = DEFAULT_VARIANT) -> str:
    """`text` (a training target written for another variant) as `variant` asks for it.

    A response with no text in a block the variant lacks is returned unchanged, well-formed or not (its
    author's choice, as before variants existed); one with such text is rebuilt from its parsed parts by
    `format_response`, which leaves that block out: an observe-format target becomes a `think` one.
    """
    result = parse(text, variant=variant)
    lacking = [TAG_FIELD[name] for name in TAG_FIELD if name not in variant_spec(variant).blocks]
    if not any(getattr(result, part) for part in lacking):
        return text
    return format_response(result.observation, result.reasoning, result.answer, variant)


@dataclass
class _Block:
    tag: str
    has_text: bool = False


@dataclass
class _Segment:
    """One contiguous run of text for a field: leading whitespace is dropped, trailing held back."""

    started: bool = False
    pending_ws: str = ""


def _is_tag_prefix(text: str) -> bool:
    return any(len(text) < len(tag) and tag.startswith(text) for tag in ALL_TAGS)


@dataclass
class StreamParser:
    """Incremental parser: `feed` chunks split anywhere, then `finish`; `result` is then set.

    `feed` returns the new text per field, never a partial tag: a chunk ending in `<thi` holds
    those characters back until the next chunk shows whether they start a tag.
    """

    nested_observe: bool = False
    variant: str = DEFAULT_VARIANT
    result: ParseResult | None = None
    _buffer: str = ""
    _stack: list[_Block] = field(default_factory=list)
    _tags: list[str] = field(default_factory=list)
    _blocks: list[_Block] = field(default_factory=list)
    _segment: _Segment = field(default_factory=_Segment)
    _parts: dict[str, list[str]] = field(default_factory=lambda: {f: [] for f in FIELDS})
    _outside_text: bool = False
    _stray: list[str] = field(default_factory=list)
    _answer_blocks: list[list[str]] = field(default_factory=list)  # the text of each <answer> block

    def __post_init__(self) -> None:
        self._spec = variant_spec(self.variant, self.nested_observe)

    def feed(self, chunk: str) -> list[Delta]:
        if self.result is not None:
            raise RuntimeError("feed() after finish()")
        out: list[Delta] = []
        text = self._buffer + chunk
        self._buffer = ""
        start = 0
        while True:
            lt = text.find("<", start)
            if lt < 0:
                self._route(text[start:], out)
                break
            self._route(text[start:lt], out)
            head = text[lt : lt + _LONGEST_TAG]
            tag = next((t for t in ALL_TAGS if head.startswith(t)), None)
            if tag is not None:
                self._on_tag(tag)
                start = lt + len(tag)
            elif len(head) < _LONGEST_TAG and _is_tag_prefix(head):
                self._buffer = text[lt:]
                break
            else:
                self._route("<", out)
                start = lt + 1
        return _merge(out)

    def finish(self) -> list[Delta]:
        """Flush held-back text (a dangling `<thi` is literal text at the end) and set `result`."""
        out: list[Delta] = []
        self._route(self._buffer, out)
        self._buffer = ""
        ok, errors = self._verdict()
        parts = ["".join(self._parts[f]) for f in FIELDS]
        graded = "".join(self._answer_blocks[0]).strip() if self._answer_blocks else parts[-1]
        self.result = ParseResult(*parts, format_ok=ok, errors=tuple(errors), graded_answer=graded)
        return _merge(out)

    def _destination(self) -> str:
        return TAG_FIELD[self._stack[-1].tag] if self._stack else "answer"

    def _route(self, text: str, out: list[Delta]) -> None:
        if not text:
            return
        seg = self._segment
        dest = self._destination()
        if not seg.started:
            text = text.lstrip()
            if not text:
                return
            if self._parts[dest]:
                self._emit(dest, SEGMENT_SEPARATOR, out)
            seg.started = True
        body = text.rstrip()
        if body:
            if self._stack:
                self._stack[-1].has_text = True
            else:
                self._outside_text = True
            self._emit(dest, seg.pending_ws + body, out)
            seg.pending_ws = text[len(body) :]
        else:
            seg.pending_ws += text

    def _emit(self, dest: str, text: str, out: list[Delta]) -> None:
        self._parts[dest].append(text)
        if self._stack and self._stack[-1].tag == "answer":
            self._answer_blocks[-1].append(text)
        out.append(Delta(dest, text))

    def _on_tag(self, tag: str) -> None:
        self._tags.append(tag)
        self._segment = _Segment()
        if tag in OPEN_TAGS:
            if tag == "<answer>":
                self._answer_blocks.append([])
            block = _Block(OPEN_TAGS[tag])
            self._stack.append(block)
            self._blocks.append(block)
            return
        name = CLOSE_TAGS[tag]
        open_names = [b.tag for b in self._stack]
        if name not in open_names:
            self._stray.append(f"{tag} without a matching <{name}>")
            return
        while self._stack.pop().tag != name:
            pass

    def _verdict(self) -> tuple[bool, list[str]]:
        spec = self._spec
        tags = tuple(self._tags)
        own_text = {b.tag: b.has_text for b in self._blocks}
        clean = not self._outside_text and all(own_text.values())
        if clean and (tags == spec.order or (self.nested_observe and tags == spec.nested_order)):
            return True, []

        tag_names = [f"<{name}>" for name in spec.blocks]
        if not tags:
            return False, [f"no {_listing(tag_names, 'or')} tags"]
        errors: list[str] = []
        for name in TAG_FIELD:
            for tag in (f"<{name}>", f"</{name}>"):
                count = tags.count(tag)
                if name not in spec.blocks and count:
                    errors.append(f"unexpected {tag}: format variant '{self.variant}' has no {name} block")
                elif name in spec.blocks and count != 1:
                    errors.append(f"expected one {tag}, found {count}")
        errors.extend(self._stray)
        errors.extend(f"unclosed <{b.tag}>" for b in self._stack)
        errors.extend(f"empty <{b.tag}> block" for b in self._blocks if not b.has_text)
        if self._outside_text:
            errors.append(f"text outside the {_listing(tag_names, 'and')} blocks")
        if not errors:
            expected = ", ".join(spec.blocks) + (
                " (or observe nested in think)" if self.nested_observe else ""
            )
            errors.append(f"blocks out of order: expected {expected}, got {' '.join(tags)}")
        return False, errors


def _listing(items: list[str], conjunction: str) -> str:
    """`a, b or c` / `a and b`: the wording of the check's errors for any number of blocks."""
    return f"{', '.join(items[:-1])} {conjunction} {items[-1]}" if len(items) > 1 else items[0]


def _merge(deltas: list[Delta]) -> list[Delta]:
    merged: list[Delta] = []
    for d in deltas:
        if merged and merged[-1].field == d.field:
            merged[-1] = Delta(d.field, merged[-1].text + d.text)
        else:
            merged.append(d)
    return merged


def parse(text: str, nested_observe: bool = False, variant: str = DEFAULT_VARIANT) -> ParseResult:
    """Split a complete response into observation, reasoning and answer, with `variant`'s format verdict."""
    parser = StreamParser(nested_observe=nested_observe, variant=variant)
    parser.feed(text)
    parser.finish()
    assert parser.result is not None
    return parser.result
