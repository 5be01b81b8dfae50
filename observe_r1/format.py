"""The Observe-R1 output format: `<observe>…</observe><think>…</think><answer>…</answer>`.

This module is the single definition of the format (docs/architecture.md): the system prompt that asks for it,
the parser that splits a response into observation, reasoning and answer, the format check used by
the format reward (docs/algorithms.md, "Output format"), and the incremental parser the server streams with.

One state machine does all of it. `parse(text)` is `StreamParser` fed the whole text at once, so a
stream split anywhere (even inside a tag) ends in exactly the result of `parse` on the joined text.

Routing (the same in strict and nested mode; only the verdict differs):
- text inside `<observe>` goes to `observation`, inside `<think>` to `reasoning`, inside `<answer>` to
  `answer`; the innermost open block wins, so an observe block nested in think is an observation;
- text outside every block goes to `answer`, so a model that ignores the format (or a stock model
  answering in plain text) still reaches the client in full;
- each block's text is stripped; several blocks of one field are joined by a newline.

Verdict (format_ok):
- strict (default, ours): exactly one of each of the six tags, in the order observe → think → answer,
  each block non-empty, nothing but whitespace between or around the blocks;
- nested (`nested_observe=True`, the authors' regex also accepts it): the strict form, or
  `<think>…<observe>…</observe>…</think><answer>…</answer>` with all three parts non-empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


def format_response(observation: str, reasoning: str, answer: str) -> str:
    """The well-formed response for the three parts (the inverse of `parse`)."""
    return f"<observe>{observation}</observe>\n<think>{reasoning}</think>\n<answer>{answer}</answer>"


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
        tags = tuple(self._tags)
        own_text = {b.tag: b.has_text for b in self._blocks}
        if tags == STRICT_ORDER and not self._outside_text and all(own_text.values()):
            return True, []
        if self.nested_observe and tags == NESTED_ORDER and not self._outside_text and all(own_text.values()):
            return True, []

        if not tags:
            return False, ["no <observe>, <think> or <answer> tags"]
        errors: list[str] = []
        for name in TAG_FIELD:
            for tag in (f"<{name}>", f"</{name}>"):
                count = tags.count(tag)
                if count != 1:
                    errors.append(f"expected one {tag}, found {count}")
        errors.extend(self._stray)
        errors.extend(f"unclosed <{b.tag}>" for b in self._stack)
        errors.extend(f"empty <{b.tag}> block" for b in self._blocks if not b.has_text)
        if self._outside_text:
            errors.append("text outside the <observe>, <think> and <answer> blocks")
        if not errors:
            expected = "observe, think, answer" + (
                " (or observe nested in think)" if self.nested_observe else ""
            )
            errors.append(f"blocks out of order: expected {expected}, got {' '.join(tags)}")
        return False, errors


def _merge(deltas: list[Delta]) -> list[Delta]:
    merged: list[Delta] = []
    for d in deltas:
        if merged and merged[-1].field == d.field:
            merged[-1] = Delta(d.field, merged[-1].text + d.text)
        else:
            merged.append(d)
    return merged


def parse(text: str, nested_observe: bool = False) -> ParseResult:
    """Split a complete response into observation, reasoning and answer, with the format verdict."""
    parser = StreamParser(nested_observe=nested_observe)
    parser.feed(text)
    parser.finish()
    assert parser.result is not None
    return parser.result
