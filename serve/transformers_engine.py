"""The transformers engine: continuous batching of concurrent requests on one decoding loop.

Requests wait in a bounded queue. A worker thread runs the decoding loop: before every step it
admits the waiting requests that fit in `max_batch_size` rows, prefills them together and joins
them to the running rows (`serve.running_batch.RunningBatch`); finished rows leave after the step
that ends them. No request waits for a batch to form or for another to finish, and the rows of a
step are whatever is in flight, as in vLLM. With `prefix_cache` (the default), a prefill starts from
the cached keys and values of the system turn its rows share (`serve.batch_inputs.PrefixCache`), so
only the rest of each prompt is computed.

Each row is sampled with its own temperature, top-p and random stream (`serve.sampling`), and its
tokens are detokenised, checked against its stop strings and `max_tokens`, and streamed to its
request; a row whose client went away ends at the next step. So a request's output does not depend
on what it shares the loop with.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from observe_r1.modeling import load_model, load_processor
from serve.batch_inputs import PrefixCache, collate
from serve.config import ServerConfig
from serve.engine import (
    ChoiceDelta,
    Engine,
    EngineRequest,
    EngineStats,
    IncrementalDetokenizer,
    PromptTooLongError,
    QueueFullError,
    StopMatcher,
    coalesce,
)
from serve.running_batch import RunningBatch
from serve.sampling import sample_rows

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

    def delta(self, text: str) -> tuple[_Job, ChoiceDelta]:
        return self.job, ChoiceDelta(self.index, text, self.tokens)

    def finish(self, text: str, reason: str) -> tuple[_Job, ChoiceDelta]:
        self.finished = True
        return self.job, ChoiceDelta(self.index, text, self.tokens, reason)

    def drain(self, reason: str, text: str = "") -> tuple[_Job, ChoiceDelta]:
        """End the row with `text` and whatever the detokenizer and the stop matcher still hold."""
        return self.finish(text + self.stopper.push(self.detokenizer.flush()) + self.stopper.flush(), reason)


def _sample(rows: list[_Row], logits: torch.Tensor) -> list[int]:
    """Each row's next token, with its own settings and random stream."""
    options = [row.job.request.sampling for row in rows]
    uniform = torch.tensor([row.random.random() for row in rows], device=logits.device)
    temperature = torch.tensor([o.temperature for o in options], device=logits.device)
    top_p = torch.tensor([o.top_p for o in options], device=logits.device)
    return sample_rows(logits, temperature, top_p, uniform).tolist()


def _advance(rows: list[_Row], tokens: list[int], eos_ids: set[int]) -> None:
    """Record each row's new token: stream its text, end the row on an end token, a stop string,
    its `max_tokens` or a client that went away."""
    out: list[tuple[_Job, ChoiceDelta]] = []
    for row, token in zip(rows, tokens, strict=True):
        if row.job.cancelled:
            row.finished = True
            continue
        row.tokens += 1
        if token in eos_ids:
            out.append(row.drain("stop"))
            continue
        text = row.stopper.push(row.detokenizer.push(token))
        if row.stopper.stopped:
            out.append(row.finish(text, "stop"))
        elif row.tokens >= row.job.request.sampling.max_tokens:
            out.append(row.drain("length", text))
        elif text:
            out.append(row.delta(text))
    _send(out)


class TransformersEngine(Engine):
    def __init__(self, config: ServerConfig):
        self.config = config
        self.name = "transformers"
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = config.dtype if config.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
        self.model = load_model(config.model, dtype=dtype, device=device)
        self.processor = load_processor(config.model)
        self.tokenizer = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [self.tokenizer.eos_token_id])
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
        self._worker = threading.Thread(target=self._loop, name="generate-worker", daemon=True)
        self._worker.start()

    def render_prompt(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def _process(self, request: EngineRequest) -> dict:
        features = self.processor(text=[request.prompt], images=request.images or None, return_tensors="pt")
        return dict(features)

    async def prepare(self, request: EngineRequest, max_prompt_tokens: int) -> None:
        inputs = await asyncio.to_thread(self._process, request)
        request.prompt_tokens = int(inputs["input_ids"].shape[1])
        if request.prompt_tokens > max_prompt_tokens:
            raise PromptTooLongError(request.prompt_tokens, max_prompt_tokens)
        request.inputs = inputs

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

    def _admit(self, free_rows: int, running: int) -> list[_Job] | None:
        """The waiting requests that fit in `free_rows` rows, in arrival order; blocks while nothing
        runs or waits. None once the engine is stopping and has nothing left to do."""
        with self._cv:
            while not running and not self._waiting and not self._stopping:
                self._cv.wait()
            if not running and not self._waiting:
                return None
            jobs: list[_Job] = []
            while self._waiting and self._waiting[0].request.sampling.n <= free_rows:
                job = self._waiting.popleft()
                if not job.cancelled:
                    jobs.append(job)
                    free_rows -= job.request.sampling.n
            self.stats.waiting = len(self._waiting)
            self.stats.running += len(jobs)
            return jobs

    def _release(self, jobs: set[_Job]) -> None:
        with self._cv:
            self.stats.running -= len(jobs)

    def _loop(self) -> None:
        batch: RunningBatch | None = None
        rows: list[_Row] = []
        tokens: list[int] = []
        while (jobs := self._admit(self.config.max_batch_size - len(rows), len(rows))) is not None:
            joined = None
            if jobs:
                try:
                    joined, new_rows, first = self._start(jobs)
                except Exception as e:  # a failed prefill fails its own requests only
                    log.exception("prefill failed for %d requests", len(jobs))
                    self._fail(jobs, e)
            if joined is None and not rows:
                continue
            try:
                if joined is not None:
                    batch = joined if batch is None else batch.join(joined)
                    rows, tokens = rows + new_rows, tokens + first
                batch, rows, tokens = self._step(batch, rows, tokens)
            except Exception as e:  # a failed step fails the requests in it, never the worker
                log.exception("decoding failed for a batch of %d rows", len(rows))
                self._fail(list({row.job: None for row in rows} | dict.fromkeys(jobs if joined else [])), e)
                batch, rows, tokens = None, [], []

    def _fail(self, jobs: list[_Job], error: Exception) -> None:
        for job in jobs:
            job.put(error)
        self._release(set(jobs))

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
        """The prefill's inputs: from the cached system turn where rows share one, else plainly
        left-padded."""
        if self.prefix_cache is not None and (inputs := self.prefix_cache.inputs(items)) is not None:
            return inputs
        return {k: v.to(self.model.device) for k, v in collate(items, self.pad_id).items()}

    @torch.inference_mode()
    def _start(self, jobs: list[_Job]) -> tuple[RunningBatch, list[_Row], list[int]]:
        """Prefill newly admitted requests: their batch, their rows and each row's first token."""
        rows = self._rows(jobs)
        batch, logits = RunningBatch.prefill(
            self.model, self._inputs([row.job.request.inputs for row in rows])
        )
        return batch, rows, _sample(rows, logits)

    @torch.inference_mode()
    def _step(
        self, batch: RunningBatch, rows: list[_Row], tokens: list[int]
    ) -> tuple[RunningBatch | None, list[_Row], list[int]]:
        """Stream the rows' latest tokens, drop the rows that ended, and decode the next token of the
        rest."""
        _advance(rows, tokens, self.eos_ids)
        alive = [i for i, row in enumerate(rows) if not row.finished]
        ended = {row.job for row in rows} - {rows[i].job for i in alive}
        if ended:
            self._release(ended)
        if len(alive) < len(rows):
            if not alive:
                return None, [], []
            batch = batch.keep(alive)
            rows, tokens = [rows[i] for i in alive], [tokens[i] for i in alive]
        logits = batch.step(self.model, torch.tensor(tokens, device=self.model.device))
        return batch, rows, _sample(rows, logits)

    async def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        await asyncio.to_thread(self._worker.join, self.config.shutdown_timeout_s)
