"""Request logic between the HTTP layer and the engine: check the parameters against the server's
limits, build the prompt, run the engine, and shape the answer.

Chat completions are split into observation, reasoning and answer with `observe_r1.format` (the
streaming parser for SSE); plain completions (`/v1/completions`) are the model's text as it comes,
with the prompt before it on `echo`. Log-probabilities are the engines' raw ones, one entry per
generated token, in OpenAI's shape for each endpoint.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from PIL import Image

from observe_r1.format import ParseResult, StreamParser, parse, system_prompt
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
from observe_r1_serve.image_rules import ImageRules
from observe_r1_serve.images import load_image
from observe_r1_serve.metrics import Metrics
from observe_r1_serve.protocol import (
    COMPLETION_MAX_TOKENS,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionTokensDetails,
    CompletionUsage,
    Delta,
    ErrorBody,
    ErrorResponse,
    ResponseMessage,
    StreamChoice,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
    dump,
)

log = logging.getLogger("observe_r1.serve")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_FIELD_NAMES = {"observation": "observation", "reasoning": "reasoning", "answer": "content"}
_LOWEST_LOGPROB = -9999.0  # what OpenAI and vLLM send for -inf, which JSON cannot carry
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


async def template_messages(
    req: ChatCompletionRequest, config: ServerConfig, image_rules: ImageRules | None
) -> tuple[list[dict], list[Image.Image]]:
    """The request's messages in the chat template's form, with the images in prompt order, each
    checked against `image_rules` (None: the model takes no images).

    The Observe-R1 system prompt goes first unless the request brings its own system message (or the
    server was started with an empty one)."""
    messages: list[dict] = []
    images: list[Image.Image] = []
    for i, message in enumerate(req.messages):
        role = ROLES[message.role]
        if message.content is None or isinstance(message.content, str):
            if image_rules is not None:
                check_text(message.content or "", f"messages[{i}].content")
            messages.append({"role": role, "content": message.content or ""})
            continue
        parts = []
        for j, part in enumerate(message.content):
            if part.type == "text":
                if image_rules is not None:
                    check_text(part.text, f"messages[{i}].content[{j}].text")
                parts.append({"type": "text", "text": part.text})
                continue
            if image_rules is None:
                raise RequestError(
                    f"the model '{config.model_name}' takes no image input",
                    param=f"messages[{i}].content[{j}]",
                )
            if len(images) >= config.max_images_per_request:
                raise RequestError(
                    f"more than {config.max_images_per_request} images in one request",
                    param=f"messages[{i}].content",
                )
            param = f"messages[{i}].content[{j}].image_url.url"
            images.append(await load_image(part.image_url.url, param, config, image_rules))
            parts.append({"type": "image"})
        messages.append({"role": role, "content": parts})
    prompt = system_prompt(config.format_variant, config.system_prompt)
    if prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": prompt})
    return messages, images


@dataclass
class _ChoiceState:
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


def _sse(body) -> str:
    return f"data: {json.dumps(dump(body), ensure_ascii=False)}\n\n"


def _error_events() -> list[str]:
    error = ErrorResponse(error=ErrorBody(message="internal server error", type="server_error"))
    return [f"data: {json.dumps(error.model_dump())}\n\n", "data: [DONE]\n\n"]


class _Offsets:
    """Character offsets of consecutive tokens in the text their bytes make: a token that begins
    inside a character (byte-level BPE splits some) is at that character."""

    def __init__(self, start: int = 0):
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.chars = start

    def next(self, data: bytes) -> int:
        at = self.chars
        self.chars += len(self.decoder.decode(data))
        return at


class Service:
    """Both endpoints over one engine: validation, queueing, token accounting and log-probabilities."""

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
        self._placeholder_ids = (
            {ids[0] for p in MEDIA_PLACEHOLDERS if len(ids := engine.encode(p)) == 1}
            if engine.image_rules is not None
            else set()
        )

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
        self, started: Started, states: list[list[_ChoiceState]], arrival: float
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

    def _count(self, requests: list[EngineRequest], states: list[list[_ChoiceState]]) -> tuple[int, int]:
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
            token=data.decode("utf-8", "replace"), logprob=max(logprob, _LOWEST_LOGPROB), bytes=list(data)
        )

    # --- chat completions -----------------------------------------------------------------------

    async def start_chat(self, req: ChatCompletionRequest) -> Started:
        sampling, ignored = self._check(req, "/v1/chat/completions")
        messages, images = await template_messages(req, self.config, self.engine.image_rules)
        request = EngineRequest(
            request_id=uuid.uuid4().hex,
            prompt=self.engine.render_prompt(messages),
            images=images,
            sampling=sampling,
        )
        return await self._queue([request], ignored)

    def _chat_states(self, n: int) -> list[list[_ChoiceState]]:
        config = self.config
        return [[_ChoiceState(StreamParser(config.nested_observe, config.format_variant)) for _ in range(n)]]

    def _chat_usage(self, started: Started, states, results: list[ParseResult]) -> Usage:
        prompt, completion = self._count(started.requests, states)
        count = self.engine.count_tokens
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            completion_tokens_details=CompletionTokensDetails(
                reasoning_tokens=sum(count(r.reasoning) for r in results),
                observation_tokens=sum(count(r.observation) for r in results),
                answer_tokens=sum(count(r.answer) for r in results),
            ),
        )

    def _chat_logprobs(self, entries: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> ChoiceLogprobs:
        return ChoiceLogprobs(content=[self._entry(e) for e in entries])

    async def complete_chat(
        self, req: ChatCompletionRequest, started: Started, arrival: float
    ) -> ChatCompletionResponse:
        states = self._chat_states(req.n)
        async for _ in self._track(started, states, arrival):
            pass
        row = states[0]
        config = self.config
        results = [parse("".join(s.raw), config.nested_observe, config.format_variant) for s in row]
        choices = []
        for index, (state, result) in enumerate(zip(row, results, strict=True)):
            self.metrics.record_choice(result.format_ok)
            message = ResponseMessage(
                content=result.answer,
                reasoning=result.reasoning,
                reasoning_content=result.reasoning,
                observation=result.observation,
                raw="".join(state.raw) if req.return_raw_text else None,
            )
            choices.append(
                Choice(
                    index=index,
                    message=message,
                    finish_reason=state.finish_reason,
                    format_ok=result.format_ok,
                    format_errors=list(result.errors),
                    logprobs=self._chat_logprobs(state.logprobs) if req.logprobs else None,
                )
            )
        usage = self._chat_usage(started, states, results)
        return ChatCompletionResponse(model=self.config.model_name, choices=choices, usage=usage)

    async def stream_chat(
        self, req: ChatCompletionRequest, started: Started, arrival: float
    ) -> AsyncIterator[str]:
        """Server-sent events: a role chunk per choice, then field deltas (each with the log-prob
        entries of the tokens whose raw text it carries; the parsed fields may hold a partial tag back
        to a later chunk), a closing chunk per choice with its finish reason and format verdict, an
        optional usage chunk, and `[DONE]`. A failure after the first event is sent as an OpenAI error
        event, then `[DONE]`."""
        states = self._chat_states(req.n)
        head = {
            "id": f"chatcmpl-{started.requests[0].request_id}",
            "created": int(time.time()),
            "model": self.config.model_name,
        }

        def chunk(choices: list[StreamChoice], usage: Usage | None = None) -> str:
            return _sse(ChatCompletionChunk(**head, choices=choices, usage=usage))

        for index in range(req.n):
            yield chunk([StreamChoice(index=index, delta=Delta(role="assistant", content=""))])
        tracked = self._track(started, states, arrival)
        try:
            async for _, item in tracked:
                parser = states[0][item.index].parser
                deltas = parser.feed(item.text) if item.text else []
                raw = item.text if req.return_raw_text and item.text else None
                logprobs = self._chat_logprobs(item.logprobs) if req.logprobs and item.logprobs else None
                if deltas or raw or logprobs:
                    choice = StreamChoice(index=item.index, delta=_delta(deltas, raw), logprobs=logprobs)
                    yield chunk([choice])
                if item.finish_reason is None:
                    continue
                tail = parser.finish()
                self.metrics.record_choice(parser.result.format_ok)
                if tail:
                    yield chunk([StreamChoice(index=item.index, delta=_delta(tail, None))])
                closing = StreamChoice(
                    index=item.index,
                    delta=Delta(),
                    finish_reason=item.finish_reason,
                    format_ok=parser.result.format_ok,
                    format_errors=list(parser.result.errors),
                )
                yield chunk([closing])
        except Exception:
            # The 200 is already sent: the client gets the error as an event, as vLLM's server sends
            # it, and a stream that ends properly leaves its keep-alive connection usable.
            log.exception("request %s failed mid-stream", started.requests[0].request_id)
            for event in _error_events():
                yield event
            return
        finally:
            await tracked.aclose()
        usage = self._chat_usage(started, states, [s.parser.result for s in states[0]])
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], usage)
        yield "data: [DONE]\n\n"

    # --- plain completions ----------------------------------------------------------------------

    def _prompts(self, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        """Each prompt as (its text, or None when given as token ids; its token ids)."""
        prompt = req.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            named = [("prompt", prompt)]
        else:
            named = [(f"prompt[{i}]", one) for i, one in enumerate(prompt)]
        out = []
        for param, one in named:
            if isinstance(one, str):
                if self._placeholder_ids:
                    check_text(one, param)
                ids = self.engine.encode(one)
                if not ids:
                    raise RequestError("the prompt tokenises to no tokens", param=param)
                out.append((one, ids))
                continue
            vocab = self.engine.vocab_size
            bad = next((j for j, t in enumerate(one) if t >= vocab), None)
            if bad is not None:
                raise RequestError(
                    f"token id {one[bad]} is not in this model's vocabulary (0 to {vocab - 1})",
                    param=f"{param}[{bad}]",
                )
            media = next((j for j, t in enumerate(one) if t in self._placeholder_ids), None)
            if media is not None:
                raise RequestError(
                    f"token id {one[media]} is the model's stand-in for an image's tokens; this endpoint"
                    " takes no images",
                    param=f"{param}[{media}]",
                )
            out.append((None, list(one)))
        return out

    async def start_completion(self, req: CompletionRequest) -> Started:
        sampling, ignored = self._check(req, "/v1/completions")
        requests = [
            EngineRequest(
                request_id=uuid.uuid4().hex,
                prompt=text or "",
                images=[],
                sampling=sampling,
                prompt_token_ids=ids,
                score_only=req.max_tokens == 0,
            )
            for text, ids in self._prompts(req)
        ]
        return await self._queue(requests, ignored)

    def _echo(self, request: EngineRequest) -> str:
        if request.prompt:
            return request.prompt
        return b"".join(self.engine.token_bytes(t) for t in request.prompt_token_ids).decode(
            "utf-8", "replace"
        )

    def _completion_logprobs(self, entries, offsets: _Offsets) -> CompletionLogprobs:
        """Entries (None: the first prompt token) in the legacy shape; the top dictionaries hold the
        k most likely tokens and the sampled one, as OpenAI's do."""
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token_id, entry in entries:
            data = self.engine.token_bytes(token_id)
            out.tokens.append(data.decode("utf-8", "replace"))
            out.text_offset.append(offsets.next(b"" if token_id in self.engine.token_bytes.hidden else data))
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            top = {self._top(t, lp).token: max(lp, _LOWEST_LOGPROB) for t, lp in entry.top}
            top[out.tokens[-1]] = max(entry.logprob, _LOWEST_LOGPROB)
            out.token_logprobs.append(max(entry.logprob, _LOWEST_LOGPROB))
            out.top_logprobs.append(top)
        return out

    def _prompt_entries(self, request: EngineRequest) -> list[tuple[int, TokenLogprob | None]]:
        return list(zip(request.prompt_token_ids, request.prompt_logprobs or [], strict=True))

    def _completion_usage(self, started: Started, states) -> CompletionUsage:
        prompt, completion = self._count(started.requests, states)
        return CompletionUsage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    async def complete_text(
        self, req: CompletionRequest, started: Started, arrival: float
    ) -> CompletionResponse:
        states = [[_ChoiceState() for _ in range(req.n)] for _ in started.requests]
        async for _ in self._track(started, states, arrival):
            pass
        choices = []
        for p, (request, row) in enumerate(zip(started.requests, states, strict=True)):
            for i, state in enumerate(row):
                echo = self._echo(request) if req.echo else ""
                logprobs = None
                if req.logprobs is not None:
                    entries = self._prompt_entries(request) if req.echo else []
                    entries += [(e.token_id, e) for e in state.logprobs]
                    logprobs = self._completion_logprobs(entries, _Offsets())
                choices.append(
                    CompletionChoice(
                        index=p * req.n + i,
                        text=echo + "".join(state.raw),
                        logprobs=logprobs,
                        finish_reason=state.finish_reason,
                    )
                )
        return CompletionResponse(
            model=self.config.model_name, choices=choices, usage=self._completion_usage(started, states)
        )

    async def stream_text(
        self, req: CompletionRequest, started: Started, arrival: float
    ) -> AsyncIterator[str]:
        """Server-sent events of `text_completion` objects: on `echo`, each choice's prompt first
        (with its log-probabilities), then its new text as it comes, each event with the entries of
        its tokens and the last with the finish reason; an optional usage event; `[DONE]`."""
        states = [[_ChoiceState() for _ in range(req.n)] for _ in started.requests]
        offsets = [[_Offsets() for _ in range(req.n)] for _ in started.requests]
        echoed = [False] * len(started.requests)
        head = {
            "id": f"cmpl-{started.requests[0].request_id}",
            "created": int(time.time()),
            "model": self.config.model_name,
        }

        def event(choices: list[CompletionChoice], usage: CompletionUsage | None = None) -> str:
            return _sse(CompletionResponse(**head, choices=choices, usage=usage))

        tracked = self._track(started, states, arrival)
        try:
            async for p, item in tracked:
                if req.echo and not echoed[p]:
                    # The prompt's log-probabilities are set before its stream's first delta.
                    echoed[p] = True
                    request = started.requests[p]
                    for i in range(req.n):
                        logprobs = None
                        if req.logprobs is not None:
                            logprobs = self._completion_logprobs(self._prompt_entries(request), offsets[p][i])
                        yield event(
                            [
                                CompletionChoice(
                                    index=p * req.n + i, text=self._echo(request), logprobs=logprobs
                                )
                            ]
                        )
                logprobs = None
                if req.logprobs is not None and item.logprobs:
                    entries = [(e.token_id, e) for e in item.logprobs]
                    logprobs = self._completion_logprobs(entries, offsets[p][item.index])
                if item.text or logprobs or item.finish_reason:
                    choice = CompletionChoice(
                        index=p * req.n + item.index,
                        text=item.text,
                        logprobs=logprobs,
                        finish_reason=item.finish_reason,
                    )
                    yield event([choice])
        except Exception:
            log.exception("request %s failed mid-stream", started.requests[0].request_id)
            for e in _error_events():
                yield e
            return
        finally:
            await tracked.aclose()
        usage = self._completion_usage(started, states)
        if req.stream_options and req.stream_options.include_usage:
            yield event([], usage)
        yield "data: [DONE]\n\n"


def _delta(deltas, raw: str | None) -> Delta:
    fields: dict[str, str] = {}
    for d in deltas:
        name = _FIELD_NAMES[d.field]
        fields[name] = fields.get(name, "") + d.text
    if "reasoning" in fields:
        fields["reasoning_content"] = fields["reasoning"]
    return Delta(**fields, raw=raw)
