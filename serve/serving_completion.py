"""`/v1/completions`: the model's text as it comes after a text or token-id prompt (several prompts
in one request), with the prompt before it on `echo` and log-probabilities in the legacy shape."""

from __future__ import annotations

import codecs
import time
import uuid
from collections.abc import AsyncIterator

from observe_r1_serve.config import RequestError, ServerConfig
from observe_r1_serve.engine import Engine, EngineRequest, TokenLogprob
from observe_r1_serve.metrics import Metrics
from observe_r1_serve.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
)
from observe_r1_serve.serving import (
    LOWEST_LOGPROB,
    MEDIA_PLACEHOLDERS,
    ChoiceState,
    Serving,
    Started,
    check_text,
    failed_mid_stream,
    sse,
)


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


class CompletionServing(Serving):
    """Plain completions."""

    def __init__(self, config: ServerConfig, engine: Engine, metrics: Metrics):
        super().__init__(config, engine, metrics)
        # the token ids of the media placeholders, which a prompt of an image model may not hold either
        self._placeholder_ids = (
            {ids[0] for p in MEDIA_PLACEHOLDERS if len(ids := engine.encode(p)) == 1}
            if engine.image_rules is not None
            else set()
        )

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
            top = {self._top(t, lp).token: max(lp, LOWEST_LOGPROB) for t, lp in entry.top}
            top[out.tokens[-1]] = max(entry.logprob, LOWEST_LOGPROB)
            out.token_logprobs.append(max(entry.logprob, LOWEST_LOGPROB))
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
        states = [[ChoiceState() for _ in range(req.n)] for _ in started.requests]
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
        states = [[ChoiceState() for _ in range(req.n)] for _ in started.requests]
        offsets = [[_Offsets() for _ in range(req.n)] for _ in started.requests]
        echoed = [False] * len(started.requests)
        head = {
            "id": f"cmpl-{started.requests[0].request_id}",
            "created": int(time.time()),
            "model": self.config.model_name,
        }

        def event(choices: list[CompletionChoice], usage: CompletionUsage | None = None) -> str:
            return sse(CompletionResponse(**head, choices=choices, usage=usage))

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
            for failure in failed_mid_stream(started):
                yield failure
            return
        finally:
            await tracked.aclose()
        usage = self._completion_usage(started, states)
        if req.stream_options and req.stream_options.include_usage:
            yield event([], usage)
        yield "data: [DONE]\n\n"
