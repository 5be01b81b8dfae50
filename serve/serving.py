"""Chat-completion logic between the HTTP layer and the engine: validate the request against the
server's limits, build the prompt, run the engine, and split every choice into observation,
reasoning and answer with `observe_r1.format` (the streaming parser for SSE)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from PIL import Image

from observe_r1.format import SYSTEM_PROMPT, ParseResult, StreamParser, parse
from observe_r1.sampling import SamplingParams, checkpoint_defaults, describe, resolve
from observe_r1_serve.config import RequestError, ServerConfig
from observe_r1_serve.engine import (
    ChoiceDelta,
    Engine,
    EngineRequest,
    PromptTooLongError,
    QueueFullError,
)
from observe_r1_serve.image_rules import ImageRules
from observe_r1_serve.images import load_image
from observe_r1_serve.metrics import Metrics
from observe_r1_serve.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    CompletionTokensDetails,
    Delta,
    ErrorBody,
    ErrorResponse,
    ResponseMessage,
    StreamChoice,
    Usage,
    dump,
)

log = logging.getLogger("observe_r1.serve")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 4
_FIELD_NAMES = {"observation": "observation", "reasoning": "reasoning", "answer": "content"}


def sampling_params(
    req: ChatCompletionRequest, config: ServerConfig, defaults: Mapping[str, float | int]
) -> SamplingParams:
    """The request's sampling settings under the server's limits; what it leaves out comes from
    `defaults` (the checkpoint's generation config, or none), then the neutral values."""
    if req.n > config.max_n:
        raise RequestError(f"n={req.n} exceeds this server's limit of {config.max_n}", param="n")
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = (
        req.max_completion_tokens
        or req.max_tokens
        or min(config.default_max_tokens, config.max_completion_tokens)
    )
    if max_tokens > config.max_completion_tokens:
        raise RequestError(
            f"{param}={max_tokens} exceeds this server's limit of {config.max_completion_tokens}", param=param
        )
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise RequestError(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
    top_k = 0 if req.top_k == -1 else req.top_k  # vLLM's older spelling of "no cut"
    requested = {"temperature": req.temperature, "top_p": req.top_p, "top_k": top_k}
    values, _ = resolve({**requested, "repetition_penalty": req.repetition_penalty}, defaults)
    return SamplingParams(**values, n=req.n, max_tokens=max_tokens, stop=stop, seed=req.seed)


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
        role = ROLES.get(message.role)
        if role is None:
            raise RequestError(
                f"unknown role '{message.role}' (use one of {', '.join(ROLES)})", param=f"messages[{i}].role"
            )
        if message.content is None or isinstance(message.content, str):
            messages.append({"role": role, "content": message.content or ""})
            continue
        parts = []
        for j, part in enumerate(message.content):
            if part.type == "text":
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
    system_prompt = SYSTEM_PROMPT if config.system_prompt is None else config.system_prompt
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages, images


@dataclass
class _ChoiceState:
    parser: StreamParser
    raw: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None


class ChatService:
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

    async def start(self, req: ChatCompletionRequest) -> tuple[EngineRequest, AsyncIterator[ChoiceDelta]]:
        """Validate, prepare and queue a request; every client error is raised here, before any
        response byte is sent, so it gets a proper status code even for a streaming request."""
        if req.model != self.config.model_name:
            raise RequestError(
                f"the model '{req.model}' does not exist; this server serves '{self.config.model_name}'",
                param="model",
                status=404,
                code="model_not_found",
            )
        sampling = sampling_params(req, self.config, self.sampling_defaults)
        messages, images = await template_messages(req, self.config, self.engine.image_rules)
        engine_request = EngineRequest(
            request_id=uuid.uuid4().hex,
            prompt=self.engine.render_prompt(messages),
            images=images,
            sampling=sampling,
        )
        try:
            await self.engine.prepare(engine_request, self.config.max_prompt_tokens)
        except PromptTooLongError as e:
            raise RequestError(str(e), param="messages", code="context_length_exceeded") from e
        try:
            stream = self.engine.generate(engine_request)
        except QueueFullError as e:
            raise RequestError(
                f"the server is busy ({e}); retry later",
                status=429,
                code="queue_full",
                type_="rate_limit_error",
                retry_after=self.config.retry_after_s,
            ) from e
        return engine_request, stream

    def _usage(self, prompt_tokens: int, states: list[_ChoiceState], results: list[ParseResult]) -> Usage:
        completion = sum(s.tokens for s in states)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.completion_tokens.inc(completion)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            total_tokens=prompt_tokens + completion,
            completion_tokens_details=CompletionTokensDetails(
                reasoning_tokens=sum(self.engine.count_tokens(r.reasoning) for r in results),
                observation_tokens=sum(self.engine.count_tokens(r.observation) for r in results),
            ),
        )

    def _states(self, n: int) -> list[_ChoiceState]:
        return [_ChoiceState(StreamParser(nested_observe=self.config.nested_observe)) for _ in range(n)]

    async def _track(
        self, stream: AsyncIterator[ChoiceDelta], states: list[_ChoiceState], arrival: float
    ) -> AsyncIterator[ChoiceDelta]:
        """The engine's deltas, recorded into `states` and the latency metrics on the way through;
        the engine stream is closed however the consumer stops (a client that went away included)."""
        first = True
        try:
            async for item in stream:
                if first and item.text:
                    self.metrics.ttft.observe(time.monotonic() - arrival)
                    first = False
                state = states[item.index]
                state.raw.append(item.text)
                state.tokens = item.completion_tokens
                state.finish_reason = item.finish_reason or state.finish_reason
                yield item
            self.metrics.e2e.observe(time.monotonic() - arrival)
        finally:
            await stream.aclose()

    async def complete(
        self,
        req: ChatCompletionRequest,
        engine_request: EngineRequest,
        stream: AsyncIterator[ChoiceDelta],
        arrival: float,
    ) -> ChatCompletionResponse:
        states = self._states(engine_request.sampling.n)
        async for _ in self._track(stream, states, arrival):
            pass
        results = [parse("".join(s.raw), nested_observe=self.config.nested_observe) for s in states]
        choices = []
        for index, (state, result) in enumerate(zip(states, results, strict=True)):
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
                )
            )
        usage = self._usage(engine_request.prompt_tokens, states, results)
        return ChatCompletionResponse(model=self.config.model_name, choices=choices, usage=usage)

    async def stream_sse(
        self,
        req: ChatCompletionRequest,
        engine_request: EngineRequest,
        stream: AsyncIterator[ChoiceDelta],
        arrival: float,
    ) -> AsyncIterator[str]:
        """Server-sent events: a role chunk per choice, then field deltas, a closing chunk per choice
        with its finish reason and format verdict, an optional usage chunk, and `[DONE]`. A failure
        after the first event is sent as an OpenAI error event, then `[DONE]`."""
        states = self._states(engine_request.sampling.n)
        head = {
            "id": f"chatcmpl-{engine_request.request_id}",
            "created": int(time.time()),
            "model": self.config.model_name,
        }

        def chunk(choices: list[StreamChoice], usage: Usage | None = None) -> str:
            body = ChatCompletionChunk(**head, choices=choices, usage=usage)
            return f"data: {json.dumps(dump(body), ensure_ascii=False)}\n\n"

        for index in range(len(states)):
            yield chunk([StreamChoice(index=index, delta=Delta(role="assistant", content=""))])
        tracked = self._track(stream, states, arrival)
        try:
            async for item in tracked:
                parser = states[item.index].parser
                deltas = parser.feed(item.text) if item.text else []
                raw = item.text if req.return_raw_text and item.text else None
                if deltas or raw:
                    yield chunk([StreamChoice(index=item.index, delta=_delta(deltas, raw))])
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
            log.exception("request %s failed mid-stream", engine_request.request_id)
            error = ErrorResponse(error=ErrorBody(message="internal server error", type="server_error"))
            yield f"data: {json.dumps(error.model_dump())}\n\n"
            yield "data: [DONE]\n\n"
            return
        finally:
            await tracked.aclose()
        usage = self._usage(engine_request.prompt_tokens, states, [s.parser.result for s in states])
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], usage)
        yield "data: [DONE]\n\n"


def _delta(deltas, raw: str | None) -> Delta:
    fields: dict[str, str] = {}
    for d in deltas:
        name = _FIELD_NAMES[d.field]
        fields[name] = fields.get(name, "") + d.text
    if "reasoning" in fields:
        fields["reasoning_content"] = fields["reasoning"]
    return Delta(**fields, raw=raw)
