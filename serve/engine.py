"""The one interface both serving engines (transformers, vLLM) implement, and the text helpers they share.

The app hands an engine a rendered prompt (or, for plain completions, the prompt's token ids), its
images and the sampling options; the engine streams back, per choice, new text with the raw
log-probabilities of its tokens when asked, and finally a finish reason. Parsing into observation/reasoning/answer
happens above the engine, so both engines split answers identically.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from observe_r1.sampling import SamplingParams
from observe_r1_serve.image_rules import ImageRules


@dataclass(frozen=True)
class TokenLogprob:
    """A token's raw log-probability (`observe_r1.sampling.SamplingParams.logprobs`) and the k most
    likely tokens at its position, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class EngineRequest:
    request_id: str
    prompt: str
    images: list[Image.Image]
    sampling: SamplingParams
    # A plain completion's prompt as token ids (the client's own, or its text tokenised without a
    # template); None: tokenise `prompt` with its images.
    prompt_token_ids: list[int] | None = None
    # Score the prompt only (`sampling.prompt_logprobs`): every choice ends at once, with no tokens.
    score_only: bool = False
    prompt_tokens: int = 0  # set by `Engine.prepare`
    inputs: Any = None  # the engine's own form of the prompt, set by `Engine.prepare`
    # With `sampling.prompt_logprobs`: one entry per prompt token (None for the first, which nothing
    # predicts), set by the engine before the stream's first delta.
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass(frozen=True)
class ChoiceDelta:
    """New text for choice `index`; `finish_reason` is set on the last delta of that choice. With
    `logprobs` requested, `logprobs` holds an entry for each token generated since the choice's last
    delta (a token whose text is still held back, an unfinished UTF-8 sequence or a possible stop
    string, comes with the delta that releases it)."""

    index: int
    text: str
    completion_tokens: int
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


def coalesce(items: list[ChoiceDelta | BaseException]) -> list[ChoiceDelta | BaseException]:
    """Consecutive deltas of the same choice merged into one (texts joined; the later token count and
    finish reason), as vLLM's output collector does: a consumer that fell behind the engine then
    sends one event for several tokens instead of one per token. Order is kept; errors stay apart."""
    merged: list[ChoiceDelta | BaseException] = []
    for item in items:
        last = merged[-1] if merged else None
        if (
            isinstance(item, ChoiceDelta)
            and isinstance(last, ChoiceDelta)
            and last.index == item.index
            and last.finish_reason is None
        ):
            merged[-1] = ChoiceDelta(
                item.index,
                last.text + item.text,
                item.completion_tokens,
                item.finish_reason,
                last.logprobs + item.logprobs,
            )
        else:
            merged.append(item)
    return merged


class QueueFullError(Exception):
    """The engine's waiting queue is at its bound; the client should retry later."""


class PromptTooLongError(Exception):
    def __init__(self, tokens: int, limit: int):
        super().__init__(f"the prompt has {tokens} tokens, more than the limit of {limit}")
        self.tokens = tokens
        self.limit = limit


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0


class Engine(abc.ABC):
    """A loaded model that turns prompts into streamed choices."""

    name: str
    stats: EngineStats
    image_rules: ImageRules | None  # what the model's image processor takes; None: no image input
    vocab_size: int  # token ids a prompt may hold: 0 .. vocab_size - 1
    token_bytes: TokenBytes  # a token id's text, as bytes, for log-probability entries

    @abc.abstractmethod
    async def prepare(self, request: EngineRequest, max_prompt_tokens: int) -> None:
        """Tokenise the prompt (with its images), set `request.prompt_tokens`; raise
        `PromptTooLongError` past the limit. Runs before the request takes a place in the queue."""

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[ChoiceDelta]:
        """Queue a prepared request and return the stream of its choices; raise `QueueFullError` at
        once when it cannot be queued. Closing the stream early (a client that went away) cancels the
        request and frees its slot."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """`text`'s token ids in the served model's tokenizer, without special tokens added."""

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` in the served model's tokenizer (for the usage details)."""
        return len(self.encode(text)) if text else 0

    @abc.abstractmethod
    def render_prompt(self, messages: list[dict]) -> str:
        """The model's chat template applied to `messages`, ending with the assistant turn's opening."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Finish or cancel in-flight work and release resources."""


class IncrementalDetokenizer:
    """Turns token ids into text one token at a time, holding back incomplete UTF-8 sequences.

    Decoding a window that starts a few tokens back (`prefix`) keeps byte-level BPE merges and
    leading-space rules right, as vLLM and transformers' streamers do.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an unfinished UTF-8 sequence at the very end)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


@dataclass
class StopMatcher:
    """Applies OpenAI `stop` strings to streamed text: text is released only once it cannot be the
    start of a stop string, and generation ends before the first stop string (which is not returned)."""

    stops: tuple[str, ...]
    _held: str = ""
    stopped: bool = field(default=False, init=False)

    def push(self, text: str, armed: bool = True) -> str:
        """The part of `text` that can be released; `armed` False: stop strings are not looked for
        yet (a response short of `min_tokens`), and nothing is held."""
        if self.stopped or not self.stops or not armed:
            held, self._held = self._held, ""
            return "" if self.stopped else held + text
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buf[: min(hits)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's `bytes_to_unicode`), reversed."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(moved)}


_BYTE_LEVEL = _byte_level_alphabet()


class TokenBytes:
    """A token id's exact bytes, as OpenAI's log-probability entries carry them (`bytes`).

    A byte-level BPE token may hold part of a UTF-8 character, which decoding alone turns into U+FFFD;
    its bytes come from the token's own spelling instead, so the entries' bytes put together are the
    response's text. Added tokens (`<|im_end|>`, ...) are their text; other tokenizers decode."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        # Left out of the text by skip_special_tokens: every added token marked special, which is more
        # than `all_special_ids` (Qwen's <|quad_start|>, <|box_end|>, ... are special added tokens).
        self.hidden = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        if (cached := self._cache.get(token_id)) is not None:
            return cached
        if token_id in self.added:
            out = self.added[token_id].encode()
        else:
            piece = self.tokenizer.convert_ids_to_tokens(token_id) if self.byte_level else None
            if piece is not None and all(ch in _BYTE_LEVEL for ch in piece):
                out = bytes(_BYTE_LEVEL[ch] for ch in piece)
            else:
                out = self.tokenizer.decode([token_id]).encode()
        self._cache[token_id] = out
        return out
