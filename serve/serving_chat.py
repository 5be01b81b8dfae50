"""`/v1/chat/completions`: the messages in the chat template's form (images loaded and checked), and
each choice split into observation, reasoning and answer with `observe_r1.format`, whole or as
server-sent events (the streaming parser)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from PIL import Image

from observe_r1.format import ParseResult, StreamParser, parse, system_prompt
from observe_r1_serve.config import RequestError, ServerConfig
from observe_r1_serve.engine import EngineRequest, TokenLogprob
from observe_r1_serve.image_rules import ImageRules
from observe_r1_serve.images import load_image
from observe_r1_serve.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    CompletionTokensDetails,
    Delta,
    ResponseMessage,
    StreamChoice,
    Usage,
)
from observe_r1_serve.serving import (
    ChoiceState,
    Serving,
    Started,
    check_text,
    failed_mid_stream,
    sse,
)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_FIELD_NAMES = {"observation": "observation", "reasoning": "reasoning", "answer": "content"}


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


class ChatServing(Serving):
    """Chat completions."""

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

    def _chat_states(self, n: int) -> list[list[ChoiceState]]:
        config = self.config
        return [[ChoiceState(StreamParser(config.nested_observe, config.format_variant)) for _ in range(n)]]

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
            return sse(ChatCompletionChunk(**head, choices=choices, usage=usage))

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
            for failure in failed_mid_stream(started):
                yield failure
            return
        finally:
            await tracked.aclose()
        usage = self._chat_usage(started, states, [s.parser.result for s in states[0]])
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
