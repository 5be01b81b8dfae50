"""The request logic both endpoints share, between the HTTP layer and the engine: check the parameters
against the server's limits, queue the prompts on the engine, track their streamed choices (metrics,
token counts) and shape log-probability entries. The endpoints build on it: chat completions in
`serving_chat` (observation, reasoning and answer split by `observe_r1.format`), plain completions in
`serving_completion`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from observe_r1.format import StreamParser
from observe_r1.sampling import SamplingParams, checkpoint_defaults, describe, resolve
from observe_r1_serve.config import RequestError, ServerConfig
from observe_r1_serve.engine import (
    ChoiceDelta,
    Engine,
    EngineRequest,
    PromptTooLongError,
    QueueFullError,
    TokenLogprob,
)
from observe_r1_serve.metrics import Metrics
from observe_r1_serve.protocol import (
    COMPLETION_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorBody,
    ErrorResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprobEntry,
    TopLogprob,
    dump,
)

log = logging.getLogger("observe_r1.serve")
LOWEST_LOGPROB = -9999.0  # what OpenAI and vLLM send for -inf, which JSON cannot carry
# The chat template's stand-ins for media (Qwen2.5-VL's): the processor expands each into one image's
# or video's tokens, so one typed into a prompt of an image model would claim features that no image
# brings (a batch-breaking mismatch in the engine), or another image's.
MEDIA_PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>")


def check_text(text: str, param: str) -> None:
    """Refuse prompt text of an image model that holds a media placeholder."""
    found = next((p for p in MEDIA_PLACEHOLDERS if p in text), None)
    if found is not None:
        raise RequestError(
            f"the text holds {found}, the model's stand-in for an image's tokens; send images as"
            " image_url content parts",
            param=param,
        )


def unknown_params(req: ChatCompletionRequest | CompletionRequest, config: ServerConfig) -> list[str]:
    """The request's fields that are no parameter of the endpoint: refused by name with
    `--reject-unknown-params`, else returned (the caller logs them and names them in a header)."""
    names = sorted(req.model_extra or {})
    if names and config.reject_unknown_params:
        raise RequestError(
            f"{names[0]}: not a parameter of this endpoint (the server refuses unknown parameters)",
            param=names[0],
            code="unknown_parameter",
        )
    return names


def _logit_bias(bias: Mapping[str, float] | None, vocab_size: int) -> dict[int, float]:
    out = {}
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise RequestError(
                f"logit_bias: '{key}' is not a token id of this model (0 to {vocab_size - 1})",
                param="logit_bias",
            )
        out[int(key)] = value
    return out


def sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    config: ServerConfig,
    defaults: Mapping[str, float | int],
    vocab_size: int,
) -> SamplingParams:
    """The request's sampling settings under the server's limits; what it leaves out comes from
    `defaults` (the checkpoint's generation config, or none), then the neutral values. A completion
    with `max_tokens` 0 is a prompt to score: one token is budgeted, and none is generated
    (`EngineRequest.score_only`)."""
    if req.n > config.max_n:
        raise RequestError(f"n={req.n} exceeds this server's limit of {config.max_n}", param="n")
    for param in ("max_tokens", "max_completion_tokens"):
        asked = getattr(req, param, None)
        if asked is not None and asked > config.max_completion_tokens:
            raise RequestError(
                f"{param}={asked} exceeds this server's limit of {config.max_completion_tokens}", param=param
            )
    if isinstance(req, ChatCompletionRequest):
        max_tokens = (
            req.max_completion_tokens
            or req.max_tokens
            or min(config.default_max_tokens, config.max_completion_tokens)
        )
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        prompt_logprobs = None
    else:
        max_tokens = (
            min(COMPLETION_MAX_TOKENS, config.max_completion_tokens)
            if req.max_tokens is None
            else req.max_tokens
        )
        logprobs = req.logprobs
        prompt_logprobs = logprobs if req.echo else None
    max_tokens = max(max_tokens, 1)
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    # -1 is vLLM's older spelling of "no cut" (0); a cut at the vocabulary's size or above cuts nothing.
    top_k = 0 if req.top_k is not None and (req.top_k == -1 or req.top_k >= vocab_size) else req.top_k
    requested = {"temperature": req.temperature, "top_p": req.top_p, "top_k": top_k}
    values, _ = resolve({**requested, "repetition_penalty": req.repetition_penalty}, defaults)
    return SamplingParams(
        **values,
        n=req.n,
        max_tokens=max_tokens,
        stop=stop,
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=_logit_bias(req.logit_bias, vocab_size),
        # More than max_tokens cannot be generated: the response then simply ends at max_tokens.
        min_tokens=min(req.min_tokens or 0, max_tokens),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


@dataclass
class ChoiceState:
    parser: StreamParser | None = None
    raw: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None


@dataclass
class Started:
    """A request queued on the engine: its engine requests (one per prompt), their merged stream of
    (prompt index, delta), and the unknown parameters it carried (ignored)."""

    requests: list[EngineRequest]
    stream: AsyncIterator[tuple[int, ChoiceDelta]]
    ignored: list[str]


async def _discard(stream: AsyncIterator[ChoiceDelta]) -> None:
    """Start a stream that will not be read and close it, so that its engine frees its place (a
    stream never started runs no clean-up of its own)."""
    async for _ in stream:
        break
    await stream.aclose()


async def _merge(streams: list[AsyncIterator[ChoiceDelta]]) -> AsyncIterator[tuple[int, ChoiceDelta]]:
    """The deltas of several prompts' streams as they come, each with its prompt's index; closing the
    merged stream closes them all."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[ChoiceDelta]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
            await queue.put((i, done))
        except Exception as e:  # handed to the consumer, which raises it
            await queue.put((i, e))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(body) -> str:
    return f"data: {json.dumps(dump(body), ensure_ascii=False)}\n\n"


def error_events() -> list[str]:
    error = ErrorResponse(error=ErrorBody(message="internal server error", type="server_error"))
    return [f"data: {json.dumps(error.model_dump())}\n\n", "data: [DONE]\n\n"]


def failed_mid_stream(started: Started) -> list[str]:
    """The events that end a stream whose engine failed after the 200 was sent: an OpenAI error event,
    as vLLM's server sends it, then `[DONE]`, so that the keep-alive connection stays usable."""
    log.exception("request %s failed mid-stream", started.requests[0].request_id)
    return error_events()


class Serving:
    """What both endpoints do over one engine: validation, queueing, token accounting, log-probabilities."""

    def __init__(self, config: ServerConfig, engine: Engine, metrics: Metrics):
        self.config = config
        self.engine = engine
        self.metrics = metrics
        self.sampling_defaults = (
            checkpoint_defaults(config.model) if config.generation_config == "auto" else {}
        )
        values, sources = resolve({}, self.sampling_defaults)
        log.info(
            "sampling defaults for settings a request leaves out (--generation-config %s): %s",
            config.generation_config,
            describe(values, sources),
        )
        self._discarding: set[asyncio.Task] = set()  # keeps the clean-up tasks referenced until they end

    # --- shared ---------------------------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if model != self.config.model_name:
            raise RequestError(
                f"the model '{model}' does not exist; this server serves '{self.config.model_name}'",
                param="model",
                status=404,
                code="model_not_found",
            )

    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        if req.model is not None:
            self._check_model(req.model)
        if req.add_special_tokens:
            raise RequestError(
                "add_special_tokens: only false is supported (the served tokenizers add no special tokens)",
                param="add_special_tokens",
                code="unsupported_parameter",
            )
        tokens = self.engine.encode(req.prompt)
        return TokenizeResponse(count=len(tokens), max_model_len=self.config.context_length, tokens=tokens)

    def _check(
        self, req: ChatCompletionRequest | CompletionRequest, path: str
    ) -> tuple[SamplingParams, list]:
        self._check_model(req.model)
        ignored = unknown_params(req, self.config)
        if ignored:
            log.warning("%s: ignored fields that are no parameter: %s", path, ", ".join(ignored))
        return sampling_params(req, self.config, self.sampling_defaults, self.engine.vocab_size), ignored

    async def _queue(self, requests: list[EngineRequest], ignored: list[str]) -> Started:
        """Prepare every request, then queue them; every client error is raised here, before any
        response byte is sent, so it gets a proper status code even for a streaming request."""
        for request in requests:
            try:
                await self.engine.prepare(request, self.config.max_prompt_tokens)
            except PromptTooLongError as e:
                param = "messages" if request.prompt_token_ids is None else "prompt"
                raise RequestError(str(e), param=param, code="context_length_exceeded") from e
        streams = []
        try:
            for request in requests:
                streams.append(self.engine.generate(request))
        except QueueFullError as e:
            for stream in streams:
                task = asyncio.create_task(_discard(stream))
                self._discarding.add(task)
                task.add_done_callback(self._discarding.discard)
            raise RequestError(
                f"the server is busy ({e}); retry later",
                status=429,
                code="queue_full",
                type_="rate_limit_error",
                retry_after=self.config.retry_after_s,
            ) from e
        return Started(requests, _merge(streams), ignored)

    async def _track(
        self, started: Started, states: list[list[ChoiceState]], arrival: float
    ) -> AsyncIterator[tuple[int, ChoiceDelta]]:
        """The engine's deltas, recorded into `states[prompt][choice]` and the latency metrics on the
        way through; the engine streams are closed however the consumer stops (a client that went
        away included)."""
        first = True
        try:
            async for prompt, item in started.stream:
                if first and item.text:
                    self.metrics.ttft.observe(time.monotonic() - arrival)
                    first = False
                state = states[prompt][item.index]
                state.raw.append(item.text)
                state.logprobs.extend(item.logprobs)
                state.tokens = item.completion_tokens
                state.finish_reason = item.finish_reason or state.finish_reason
                yield prompt, item
            self.metrics.e2e.observe(time.monotonic() - arrival)
        finally:
            await started.stream.aclose()

    def _count(self, requests: list[EngineRequest], states: list[list[ChoiceState]]) -> tuple[int, int]:
        prompt = sum(r.prompt_tokens for r in requests)
        completion = sum(s.tokens for row in states for s in row)
        self.metrics.prompt_tokens.inc(prompt)
        self.metrics.completion_tokens.inc(completion)
        return prompt, completion

    def _entry(self, item: TokenLogprob) -> TokenLogprobEntry:
        return TokenLogprobEntry(
            **self._top(item.token_id, item.logprob).model_dump(),
            top_logprobs=[self._top(token, logprob) for token, logprob in item.top],
        )

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        data = self.engine.token_bytes(token_id)
        return TopLogprob(
            token=data.decode("utf-8", "replace"), logprob=max(logprob, LOWEST_LOGPROB), bytes=list(data)
        )
