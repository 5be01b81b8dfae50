"""The reference model's samples, from either of two places behind one interface (`Sampler`):

- `LocalSampler`: a local checkpoint in this process, through the training rollout engine
  (`TransformersRollout`): several questions per `generate` call, each prefilled with its images
  encoded once and its K samples decoded together. Calls are fixed slices of the question list,
  each seeded from its questions, so a resumed run samples exactly what an uninterrupted one would.
- `ServerSampler`: a model behind any OpenAI-compatible server, through the `openai` client: n=K per
  request where the server takes it (else n=1), several requests in flight, each seeded from its
  question, retried with backoff on timeouts, connection errors, 429 and 5xx, then stopped with a
  message. Every setting of `SamplingParams` is sent, top_k and repetition_penalty as vLLM's extras,
  so a server's checkpoint defaults never apply (docs/architecture.md, "Sampling").

Both add each question's samples to the cache as they arrive and skip what it already holds.
"""

from __future__ import annotations

import abc
import base64
import hashlib
import logging
import mimetypes
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from observe_r1.data import DataError, Sample, is_url
from observe_r1.errors import UserError
from observe_r1.sampling import SamplingParams

if TYPE_CHECKING:
    from observe_r1_train.ladder.cache import SampleCache
    from observe_r1_train.ladder.config import EngineConfig, ServerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Response:
    """One sample: its text, generated tokens (end-of-turn token included, as the trainer counts them),
    whether `tokens` was counted for this response alone (else it is its request's mean, which keeps
    a question's mean exact), and the finish reason ("stop", "length")."""

    text: str
    tokens: float
    exact: bool
    finish: str


@dataclass(frozen=True)
class Question:
    """A row to sample: `key` hashes what the model sees (question text and image pixels)."""

    key: str
    sample: Sample
    location: str


def derive_seed(*parts: Any) -> int:
    """A 60-bit seed from `parts`, the same in every process (unlike `hash`)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()
    return int(digest[:15], 16)


class Sampler(abc.ABC):
    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """What identifies this model and engine in the cache's settings."""

    @abc.abstractmethod
    def generate(
        self,
        questions: list[Question],
        params: SamplingParams,
        system_prompt: str | None,
        cache: SampleCache,
        advance: Callable[[int], object],
    ) -> None:
        """`params.n` samples of every question the cache lacks, added to it as they come;
        `advance(k)` is called as k more questions are done."""


def _auto_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class LocalSampler(Sampler):
    """A local checkpoint through `TransformersRollout`; `rows_per_call` sequences per `generate` call
    (`engine.batch_questions` x K for the reference samples; the pre-filter's single answers fill the
    same number of rows)."""

    def __init__(self, model_dir: str, engine: EngineConfig, rows_per_call: int):
        from observe_r1.modeling import load_model, load_processor
        from observe_r1_train.rollout import TransformersRollout

        self.model_dir = Path(model_dir)
        self.device = _auto_device(engine.device)
        self.dtype = engine.dtype if engine.dtype != "auto" else ("bf16" if self.device != "cpu" else "fp32")
        self.rows_per_call = rows_per_call
        processor = load_processor(self.model_dir)
        model = load_model(self.model_dir, dtype=self.dtype, device=self.device)
        self.rollout = TransformersRollout(model, processor)

    def describe(self) -> dict[str, Any]:
        folder = self.model_dir.resolve()
        weights = {p.name: p.stat().st_size for p in sorted(folder.glob("*.safetensors"))}
        config = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
        return {
            "model": str(folder),
            "config_sha256": config,
            "weight_bytes": weights,
            "dtype": self.dtype,
            "device": self.device,
            "rows_per_call": self.rows_per_call,
        }

    def check_prompts(self, questions: list[Question], system_prompt: str | None, limit: int) -> None:
        """Refuse, before any sampling, a row whose prompt (images included) is over `limit` tokens,
        or whose images are URLs (the in-process engine reads local files only)."""
        from observe_r1_train.rollout import process_prompt

        for q in questions:
            if any(is_url(ref) for ref in q.sample.images):
                raise DataError(q.location, "images", "a local reference model reads image files, not URLs")
            tokens = process_prompt(self.rollout.processor, q.sample, q.sample.question, system_prompt)
            length = tokens["input_ids"].shape[1]
            if length > limit:
                raise DataError(
                    q.location,
                    "question",
                    f"the prompt has {length} tokens with its images, more than sampling.max_prompt_tokens"
                    f" = {limit}",
                )

    def generate(self, questions, params, system_prompt, cache, advance) -> None:
        per_call = max(1, self.rows_per_call // params.n)
        for start in range(0, len(questions), per_call):
            chunk = questions[start : start + per_call]
            todo = {q.key for q in chunk if not cache.has(q.key, params.n)}
            if not todo:
                continue
            # The whole fixed slice is sampled again, so its seed and padding match a run that was never cut.
            seed = derive_seed(params.seed, *(q.key for q in chunk))
            batch = self.rollout.generate(
                [q.sample for q in chunk],
                [q.sample.question for q in chunk],
                replace(params, seed=seed),
                system_prompt,
            )
            lengths = batch.completion_lengths.tolist()
            results = []
            for i, q in enumerate(chunk):
                rows = range(i * params.n, (i + 1) * params.n)
                responses = [
                    Response(batch.texts[r], lengths[r], True, batch.finish_reasons[r]) for r in rows
                ]
                if q.key in todo:
                    results.append((q.key, responses))
            cache.add(results)
            advance(len(results))


class ServerError(UserError):
    """The reference server failed a request for good (after the retries), or refused it."""


def _image_url(ref: str) -> str:
    if is_url(ref):
        return ref
    mime = mimetypes.guess_type(ref)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(Path(ref).read_bytes()).decode()}"


class ServerSampler(Sampler):
    def __init__(self, url: str, model: str, server: ServerConfig):
        import openai

        self.url, self.model, self.cfg = url, model, server
        self.client = openai.OpenAI(
            base_url=url,
            api_key=os.environ.get(server.api_key_env) or "none",
            max_retries=0,  # ours, below: with backoff, and a message that names the question
            timeout=server.timeout_s,
        )
        self.per_request = server.samples_per_request
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"server": self.url, "model": self.model, "samples_per_request": self.cfg.samples_per_request}

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        """`fn()` with retries on transient failures; a 4xx other than 408/429 stops at once."""
        import openai

        for attempt in range(self.cfg.retries + 1):
            try:
                return fn()
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as e:
                error = e
            except openai.APIStatusError as e:
                if e.status_code != 408:
                    raise ServerError(f"the server at {self.url} refused {what}: {e}") from e
                error = e
            if attempt < self.cfg.retries:
                wait_s = min(self.cfg.backoff_s * 2**attempt, self.cfg.backoff_max_s)
                log.warning("%s failed (%s); retrying in %.1fs", what, error, wait_s)
                time.sleep(wait_s)
        raise ServerError(f"the server at {self.url} failed {what} {self.cfg.retries + 1} times: {error}")

    def check(self) -> None:
        """The server answers and serves `model`, before anything is sampled."""
        served = [m.id for m in self._call(lambda: list(self.client.models.list()), "listing its models")]
        if self.model not in served:
            raise ServerError(
                f"the server at {self.url} does not serve '{self.model}' (it serves {', '.join(served)})"
            )

    def _request(self, q: Question, params: SamplingParams, system_prompt: str | None, n: int, seed: int):
        import openai

        content = [{"type": "image_url", "image_url": {"url": _image_url(ref)}} for ref in q.sample.images]
        content.append({"type": "text", "text": q.sample.question})
        messages = [{"role": "user", "content": content}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        request = {
            "model": self.model,
            "messages": messages,
            "n": n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "seed": seed,
            "extra_body": {
                "top_k": params.top_k,
                "repetition_penalty": params.repetition_penalty,
                **self.cfg.extra_body,
            },
        }
        if self.cfg.logprobs:
            request["logprobs"] = True
        try:
            return self.client.chat.completions.create(**request)
        except openai.BadRequestError as e:
            if n > 1 and getattr(e, "param", None) == "n":
                with self._lock:
                    if self.per_request != 1:
                        log.warning("the server refuses n=%d (%s); asking for one sample per request", n, e)
                    self.per_request = 1
                return None
            raise

    def _question(self, q: Question, params: SamplingParams, system_prompt: str | None) -> list[Response]:
        out: list[Response] = []
        while len(out) < params.n:
            n = min(self.per_request or params.n, params.n - len(out))
            seed = derive_seed(params.seed, q.key, len(out))
            what = f"the request for question '{q.sample.id}' ({q.location})"
            response = self._call(lambda: self._request(q, params, system_prompt, n, seed), what)  # noqa: B023
            if response is None:  # n refused: again with n=1
                continue
            out += self._responses(response, what)[: params.n - len(out)]
        return out

    def _responses(self, response, what: str) -> list[Response]:
        choices = response.choices
        if not choices:
            raise ServerError(f"the server at {self.url} answered {what} with no choices")
        total = response.usage.completion_tokens if response.usage is not None else None
        out = []
        for choice in choices:
            text = (choice.message.model_extra or {}).get("raw") or choice.message.content or ""
            counted = choice.logprobs.content if choice.logprobs is not None else None
            if counted is not None:
                tokens, exact = len(counted), True
            elif total is not None:
                tokens, exact = total / len(choices), len(choices) == 1
            else:
                raise ServerError(
                    f"the server at {self.url} reports no token counts (usage or logprobs) for {what}"
                )
            out.append(Response(text, tokens, exact, choice.finish_reason or "stop"))
        return out

    def generate(self, questions, params, system_prompt, cache, advance) -> None:
        todo = [q for q in questions if not cache.has(q.key, params.n)]
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            futures = {pool.submit(self._question, q, params, system_prompt): q for q in todo}
            failure = None
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                error = future.exception()
                if error is None:
                    cache.add([(futures[future].key, future.result())])
                    advance(1)
                elif failure is None:
                    # Stop: nothing new starts; what is in flight still finishes into the cache.
                    failure = error
                    for other in futures:
                        other.cancel()
        if isinstance(failure, ServerError):
            raise ServerError(
                f"{failure}; the samples made so far are kept in {cache.path}: run the same command again"
                " to continue"
            ) from failure
        if failure is not None:
            raise failure
