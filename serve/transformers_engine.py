"""The transformers engine: concurrent requests share batched `generate` calls.

Requests wait in a bounded queue; a worker thread takes as many as fit in `max_batch_size` sequences,
left-pads them into one batch and runs one `generate`. Clients that come back together after a batch
reach the queue spread over hundreds of milliseconds (each request is parsed, its images decoded and
its prompt processed in turn), so a batch starts only once no request has arrived for
`batch_wait_ms` and none is still being prepared, at most `max_batch_wait_ms` after its first
request. A lone client (the previous batch had one row and nothing else is pending) never waits.
With `prefix_cache` (the default), a batch starts from the cached keys and values of the system turn
its rows share (`observe_r1_serve.batch_inputs.PrefixCache`), so only the rest of each prompt is prefilled.
Two hooks make one shared call behave like separate requests:
- `_RowSampler` (a logits processor) takes each row's raw log-probabilities where asked, applies its
  logit bias, `min_tokens` and penalties, and samples all rows in one vectorised pass
  (`observe_r1_serve.sampling`), each with its own temperature, top-p and seeded random stream, so a
  request's output does not depend on its batch neighbours;
- `_RowMonitor` (a stopping criterion) sees each new token, streams it to its request (a step's
  text in one hand-over to the event loop), applies end-of-sequence tokens (unless `ignore_eos`),
  stop strings and per-request `max_tokens`, and ends rows whose client went away.
generate's own end-of-sequence check is off (`eos_token_id=[]`): ending rows is `_RowMonitor`'s alone,
so that an `ignore_eos` row goes on past its end token in the same batch as rows that stop there.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from observe_r1.modeling import load_model, load_processor, position_ids
from observe_r1.sampling import end_of_turn_ids
from observe_r1_serve.batch_inputs import PrefixCache, collate
from observe_r1_serve.config import ServerConfig
from observe_r1_serve.engine import (
    ChoiceDelta,
    Engine,
    EngineRequest,
    EngineStats,
    IncrementalDetokenizer,
    PromptTooLongError,
    QueueFullError,
    StopMatcher,
    TokenBytes,
    TokenLogprob,
    coalesce,
)
from observe_r1_serve.image_rules import ImageRules
from observe_r1_serve.sampling import (
    apply_presence_frequency,
    apply_repetition_penalty,
    sample_rows,
    top_logprobs,
)

log = logging.getLogger("observe_r1.serve")


@dataclass(eq=False)
class _Job:
    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def put(self, item: ChoiceDelta | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _deliver(items: list[tuple[_Job, ChoiceDelta]]) -> None:
    for job, delta in items:
        job.queue.put_nowait(delta)


def _send(items: list[tuple[_Job, ChoiceDelta]]) -> None:
    """Hand a decoding step's deltas to their requests' event loops: one wake-up per loop, not one
    per row, as the loop is also busy writing every stream's events."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, ChoiceDelta]]] = {}
    for job, delta in items:
        by_loop.setdefault(job.loop, []).append((job, delta))
    for loop, batch in by_loop.items():
        loop.call_soon_threadsafe(_deliver, batch)


@dataclass
class _Row:
    job: _Job
    index: int
    detokenizer: IncrementalDetokenizer
    stopper: StopMatcher
    random: random.Random
    tokens: int = 0
    finished: bool = False
    pending: list[TokenLogprob] = field(default_factory=list)  # entries of tokens not yet sent

    @property
    def sampling(self):
        return self.job.request.sampling

    def _take(self) -> tuple[TokenLogprob, ...]:
        entries, self.pending = tuple(self.pending), []
        return entries

    def delta(self, text: str) -> tuple[_Job, ChoiceDelta]:
        return self.job, ChoiceDelta(self.index, text, self.tokens, logprobs=self._take())

    def finish(self, text: str, reason: str) -> tuple[_Job, ChoiceDelta]:
        self.finished = True
        return self.job, ChoiceDelta(self.index, text, self.tokens, reason, self._take())

    def drain(self, reason: str, text: str = "") -> tuple[_Job, ChoiceDelta]:
        """End the row with `text` and whatever the detokenizer and the stop matcher still hold."""
        return self.finish(text + self.stopper.push(self.detokenizer.flush()) + self.stopper.flush(), reason)


class _RowSampler(LogitsProcessor):
    """Chooses every row's next token itself (`observe_r1_serve.sampling.sample_rows`, each row with its
    own settings and random stream) and returns logits that make greedy decoding pick it.

    In the order vLLM applies them: the raw log-probabilities are read from the model's logits first;
    then the logit bias, the end-of-sequence ban of rows short of `min_tokens`, the repetition penalty
    and the presence and frequency penalties; then temperature, top-k and top-p in `sample_rows`."""

    def __init__(self, rows: list[_Row], pad_id: int, eos_ids: set[int], device: torch.device):
        self.rows = rows
        self.pad_id = pad_id
        options = [row.sampling for row in rows]
        self.temperature = torch.tensor([o.temperature for o in options], device=device)
        self.top_p = torch.tensor([o.top_p for o in options], device=device)
        self.top_k = torch.tensor([o.top_k for o in options], device=device)
        self.penalty = torch.tensor([o.repetition_penalty for o in options], device=device)
        self.penalised = (self.penalty != 1).nonzero().squeeze(1)
        self.seen: torch.Tensor | None = None  # (penalised rows x vocabulary): tokens of prompt and response
        presence = torch.tensor([o.presence_penalty for o in options], device=device)
        frequency = torch.tensor([o.frequency_penalty for o in options], device=device)
        self.counted = ((presence != 0) | (frequency != 0)).nonzero().squeeze(1)
        self.presence, self.frequency = presence[self.counted], frequency[self.counted]
        self.counts: torch.Tensor | None = None  # (counted rows x vocabulary): tokens in the response
        self.biases = [
            (r, torch.tensor(list(o.logit_bias), device=device), torch.tensor(list(o.logit_bias.values())))
            for r, o in enumerate(options)
            if o.logit_bias
        ]
        self.eos = torch.tensor(sorted(eos_ids), device=device)
        self.short = [r for r, o in enumerate(options) if o.min_tokens]
        self.logged = [r for r, o in enumerate(options) if o.logprobs is not None]
        self.step = 0

    def _penalise(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> None:
        """The repetition penalty of the rows that have one, over each row's own prompt (its padding
        and any prefix it does not share left out) and what it has generated so far."""
        if self.seen is None:
            self.seen = torch.zeros(
                len(self.penalised), scores.shape[1], dtype=torch.bool, device=scores.device
            )
            for i, r in enumerate(self.penalised.tolist()):
                self.seen[i, self.rows[r].job.request.inputs["input_ids"][0].to(scores.device)] = True
        self.seen[torch.arange(len(self.penalised)), input_ids[self.penalised, -1]] = True
        scores[self.penalised] = apply_repetition_penalty(
            scores[self.penalised], self.seen, self.penalty[self.penalised]
        )

    def _count(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> None:
        """Presence and frequency penalties over the tokens each counted row has generated."""
        if self.counts is None:
            self.counts = torch.zeros(len(self.counted), scores.shape[1], device=scores.device)
        if self.step:  # at the first step the last input token is the prompt's
            self.counts[torch.arange(len(self.counted)), input_ids[self.counted, -1]] += 1
        scores[self.counted] = apply_presence_frequency(
            scores[self.counted], self.counts, self.presence.to(scores.dtype), self.frequency.to(scores.dtype)
        )

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logged = [r for r in self.logged if not self.rows[r].finished]
        raw = torch.log_softmax(scores[logged], dim=-1) if logged else None
        for r, ids, values in self.biases:
            scores[r, ids] += values.to(scores.device)
        for r in self.short:
            if self.rows[r].tokens < self.rows[r].sampling.min_tokens:
                scores[r, self.eos] = float("-inf")
        if self.penalised.numel():
            self._penalise(input_ids, scores)
        if self.counted.numel():
            self._count(input_ids, scores)
        self.step += 1
        uniform = torch.tensor([0.0 if row.finished else row.random.random() for row in self.rows])
        chosen = sample_rows(scores, self.temperature, self.top_p, uniform.to(scores.device), self.top_k)
        if logged:
            k = max(self.rows[r].sampling.logprobs for r in logged)
            for r, (logprob, top) in zip(logged, top_logprobs(raw, chosen[logged], k), strict=True):
                kept = tuple(top[: self.rows[r].sampling.logprobs])
                self.rows[r].pending.append(TokenLogprob(int(chosen[r]), logprob, kept))
        finished = torch.tensor([row.finished for row in self.rows], device=scores.device)
        chosen[finished] = self.pad_id
        # `scores` is generate's own float32 copy of this step's logits: marking the chosen token +inf
        # in place makes its argmax pick it, without writing the whole (rows x vocabulary) tensor.
        return scores.scatter_(1, chosen[:, None], float("inf"))


class _RowMonitor(StoppingCriteria):
    def __init__(self, rows: list[_Row], eos_ids: set[int]):
        self.rows = rows
        self.eos_ids = eos_ids

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        out: list[tuple[_Job, ChoiceDelta]] = []
        for row, token in zip(self.rows, last, strict=True):
            if row.finished:
                continue
            if row.job.cancelled:
                row.finished = True
                continue
            row.tokens += 1
            if token in self.eos_ids and not row.sampling.ignore_eos:
                out.append(row.drain("stop"))
                continue
            # Stop strings count once the response is past min_tokens, as in vLLM.
            armed = row.tokens > row.sampling.min_tokens
            text = row.stopper.push(row.detokenizer.push(token), armed)
            if row.stopper.stopped:
                out.append(row.finish(text, "stop"))
            elif row.tokens >= row.sampling.max_tokens:
                out.append(row.drain("length", text))
            elif text:
                out.append(row.delta(text))
        _send(out)
        return torch.tensor([row.finished for row in self.rows], device=input_ids.device)


class TransformersEngine(Engine):
    def __init__(self, config: ServerConfig):
        self.config = config
        self.name = "transformers"
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = config.dtype if config.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
        self.model = load_model(config.model, dtype=dtype, device=device)
        self.processor = load_processor(config.model)
        self.tokenizer = self.processor.tokenizer
        self.image_rules = ImageRules.of(self.processor.image_processor)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.token_bytes = TokenBytes(self.tokenizer)
        self.eos_ids = set(end_of_turn_ids(self.tokenizer, self.model.generation_config.eos_token_id))
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        )
        self.prefix_cache = (
            PrefixCache(self.model, self.tokenizer, self.pad_id) if config.prefix_cache else None
        )
        self.stats = EngineStats()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._preparing = 0
        self._last_batch_rows = 0
        self._worker = threading.Thread(target=self._loop, name="generate-worker", daemon=True)
        self._worker.start()

    def render_prompt(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _process(self, request: EngineRequest) -> dict:
        if request.prompt_token_ids is not None:
            ids = torch.tensor([request.prompt_token_ids])
            return {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "mm_token_type_ids": torch.zeros_like(ids),
            }
        features = self.processor(text=[request.prompt], images=request.images or None, return_tensors="pt")
        return dict(features)

    async def prepare(self, request: EngineRequest, max_prompt_tokens: int) -> None:
        with self._cv:
            self._preparing += 1
        try:
            inputs = await asyncio.to_thread(self._process, request)
            request.prompt_tokens = int(inputs["input_ids"].shape[1])
            if request.prompt_tokens > max_prompt_tokens:
                raise PromptTooLongError(request.prompt_tokens, max_prompt_tokens)
            request.inputs = inputs
        finally:
            with self._cv:
                self._preparing -= 1
                self._cv.notify()

    def generate(self, request: EngineRequest) -> AsyncIterator[ChoiceDelta]:
        if request.inputs is None:
            raise RuntimeError("generate() before prepare()")
        job = _Job(request, asyncio.get_running_loop())
        with self._cv:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if len(self._waiting) >= self.config.max_waiting:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(job)
            self.stats.waiting = len(self._waiting)
            self._cv.notify()
        return self._stream(job)

    async def _stream(self, job: _Job) -> AsyncIterator[ChoiceDelta]:
        remaining = job.request.sampling.n
        try:
            while remaining:
                items = [await job.queue.get()]
                while not job.queue.empty():
                    items.append(job.queue.get_nowait())
                for item in coalesce(items):
                    if isinstance(item, BaseException):
                        raise item
                    if item.finish_reason is not None:
                        remaining -= 1
                    yield item
        finally:
            job.cancelled = True
            with self._cv:
                if job in self._waiting:
                    self._waiting.remove(job)
                    self.stats.waiting = len(self._waiting)

    def _rows_waiting(self) -> int:
        return sum(j.request.sampling.n for j in self._waiting)

    def _take_batch(self) -> list[_Job] | None:
        """Block until work arrives, then take the jobs that fit in one batch (at least one)."""
        limit = self.config.max_batch_size
        with self._cv:
            while not self._waiting and not self._stopping:
                self._cv.wait()
            if not self._waiting:
                return None
            start = last_arrival = time.monotonic()
            cap = start + self.config.max_batch_wait_ms / 1000
            gap = self.config.batch_wait_ms / 1000
            rows = self._rows_waiting()
            alone = self._last_batch_rows <= 1 and rows == 1 and not self._preparing
            while not alone and rows < limit and not self._stopping:
                now = time.monotonic()
                if self._rows_waiting() != rows:
                    rows, last_arrival = self._rows_waiting(), now
                deadline = cap if self._preparing else min(cap, last_arrival + gap)
                if now >= deadline:
                    break
                self._cv.wait(timeout=deadline - now)
            batch: list[_Job] = []
            rows = 0
            while self._waiting and (not batch or rows + self._waiting[0].request.sampling.n <= limit):
                job = self._waiting.popleft()
                if not job.cancelled:
                    batch.append(job)
                    rows += job.request.sampling.n
            self.stats.waiting = len(self._waiting)
            self.stats.running += len(batch)
            self._last_batch_rows = rows
            return batch

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            try:
                if batch:
                    self._run(batch)
            except Exception as e:  # a failed batch fails its requests, never the worker
                log.exception("generate failed for a batch of %d requests", len(batch))
                for job in batch:
                    job.put(e)
            finally:
                with self._cv:
                    self.stats.running -= len(batch)

    def _rows(self, batch: list[_Job]) -> list[_Row]:
        rows = []
        for job in batch:
            sampling = job.request.sampling
            for index in range(sampling.n):
                seed = sampling.seed + index if sampling.seed is not None else None
                rows.append(
                    _Row(
                        job,
                        index,
                        IncrementalDetokenizer(self.tokenizer),
                        StopMatcher(sampling.stop),
                        random.Random(seed),
                    )
                )
        return rows

    def _inputs(self, items: list[dict]) -> dict:
        """The batch's `generate` inputs: from the cached system turn where rows share one, else
        plainly left-padded."""
        if self.prefix_cache is not None and (inputs := self.prefix_cache.inputs(items)) is not None:
            return inputs
        return {k: v.to(self.model.device) for k, v in collate(items, self.pad_id).items()}

    def _score_prompt(self, request: EngineRequest) -> None:
        """`request.prompt_logprobs`: each prompt token's raw log-probability given the tokens before it,
        from one forward pass over the prompt alone."""
        inputs = {k: v.to(self.model.device) for k, v in request.inputs.items()}
        logits = self.model(**inputs, position_ids=position_ids(self.model, inputs)).logits[0, :-1]
        ids = inputs["input_ids"][0, 1:]
        k = request.sampling.prompt_logprobs
        scored = top_logprobs(torch.log_softmax(logits.float(), dim=-1), ids, k) if len(ids) else []
        request.prompt_logprobs = [None] + [
            TokenLogprob(token, logprob, tuple(top))
            for token, (logprob, top) in zip(ids.tolist(), scored, strict=True)
        ]

    @torch.inference_mode()
    def _run(self, batch: list[_Job]) -> None:
        for job in batch:
            if job.request.sampling.prompt_logprobs is not None:
                self._score_prompt(job.request)
            if job.request.score_only:
                _send([(job, ChoiceDelta(i, "", 0, "length")) for i in range(job.request.sampling.n)])
        batch = [job for job in batch if not job.request.score_only]
        if not batch:
            return
        rows = self._rows(batch)
        inputs = self._inputs([row.job.request.inputs for row in rows])
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=max(row.sampling.max_tokens for row in rows),
            eos_token_id=[],  # rows end in _RowMonitor only (see the module's docstring)
            pad_token_id=self.pad_id,
        )
        self.model.generate(
            **inputs,
            generation_config=config,
            logits_processor=LogitsProcessorList(
                [_RowSampler(rows, self.pad_id, self.eos_ids, self.model.device)]
            ),
            stopping_criteria=StoppingCriteriaList([_RowMonitor(rows, self.eos_ids)]),
        )
        _send([row.drain("length") for row in rows if not row.finished and not row.job.cancelled])

    async def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        await asyncio.to_thread(self._worker.join, self.config.shutdown_timeout_s)
