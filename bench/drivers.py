"""What produces the numbers: a setup (a server and its workload), a server process on a free port,
closed-loop streaming clients against it, and in-process `generate` (the ceiling a server can approach)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from workload import QUESTION

from observe_r1.chat import build_messages
from observe_r1.net import free_port  # noqa: F401 (the benchmarks take it from here)

REPO = Path(__file__).resolve().parent.parent
TEXT_FIELDS = ("content", "reasoning", "reasoning_content", "observation")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def in_process(model_dir: Path, image, batches: tuple[int, ...], max_tokens: int, repeats: int) -> dict:
    """Tokens/s of `generate` alone, exactly `max_tokens` per row, on identical prompts, by batch size:
    `plain` with inputs prepared beforehand, `prefix_cache` starting from the cached system turn as our
    server does (building each run's inputs, which copies the cache, is timed). Each is the median of
    `repeats` timed runs after one warm-up run (the first call is ~4x slower). Runs of one new token
    time the prefill (vision encoder and prompt) on its own, which shows how much of a batch's time
    batching cannot share out on a CPU."""
    import torch

    from observe_r1.modeling import load_model, load_processor
    from observe_r1_serve.batch_inputs import PrefixCache

    model = load_model(model_dir)
    processor = load_processor(model_dir)
    prompt = processor.apply_chat_template(
        build_messages(QUESTION, 1), add_generation_prompt=True, tokenize=False
    )
    prefix_cache = PrefixCache(model, processor.tokenizer, processor.tokenizer.pad_token_id)
    item = dict(processor(text=[prompt], images=[image], return_tensors="pt"))
    with torch.inference_mode():
        prefix_cache.inputs([item])  # the system turn is prefilled once, as in a running server

    def timed(make_inputs: Callable[[], dict], new_tokens: int, seed: int) -> tuple[float, int]:
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.inference_mode():
            inputs = make_inputs()
            ids = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
            )
        return time.perf_counter() - start, ids.shape[0] * (ids.shape[1] - inputs["input_ids"].shape[1])

    def measure(make_inputs: Callable[[], dict]) -> dict:
        timed(make_inputs, max_tokens, 0)
        runs = [timed(make_inputs, max_tokens, seed) for seed in range(1, repeats + 1)]
        rates = [tokens / seconds for seconds, tokens in runs]
        return {
            "tokens_per_s": statistics.median(rates),
            "runs_tokens_per_s": rates,
            "batch_s": statistics.median(seconds for seconds, _ in runs),
            "prefill_s": statistics.median(timed(make_inputs, 1, seed)[0] for seed in range(repeats)),
        }

    out: dict[str, dict] = {"plain": {}, "prefix_cache": {}}
    for batch in batches:
        start = time.perf_counter()
        inputs = processor(text=[prompt] * batch, images=[image] * batch, return_tensors="pt")
        preprocess_s = time.perf_counter() - start
        shared = {"prompt_tokens": int(inputs["input_ids"].shape[1]), "preprocess_s": preprocess_s}
        out["plain"][batch] = {**measure(lambda inputs=inputs: inputs), **shared}
        out["prefix_cache"][batch] = {
            **measure(lambda batch=batch: prefix_cache.inputs([item] * batch)),
            **shared,
        }
        for mode in out:
            row = out[mode][batch]
            log(
                f"in-process {mode} batch {batch}: {row['tokens_per_s']:.1f} tok/s, {row['batch_s']:.2f}s per "
                f"batch of which prefill {row['prefill_s']:.2f}s "
                f"(runs: {', '.join(f'{r:.1f}' for r in row['runs_tokens_per_s'])} tok/s)"
            )
    return out


def merge_in_process(rounds: list[dict]) -> dict:
    """In-process measurements of several rounds as one: medians over every timed run."""
    merged: dict[str, dict] = {}
    for mode, batches in rounds[0].items():
        merged[mode] = {}
        for batch, first in batches.items():
            rows = [r[mode][batch] for r in rounds]
            runs = [rate for row in rows for rate in row["runs_tokens_per_s"]]
            merged[mode][batch] = {
                **first,
                "tokens_per_s": statistics.median(runs),
                "runs_tokens_per_s": runs,
                "batch_s": statistics.median(row["batch_s"] for row in rows),
                "prefill_s": statistics.median(row["prefill_s"] for row in rows),
            }
    return merged


@dataclass
class Setup:
    """A server under test: how to start it and what to send it; `levels` and `error` collect what it
    measured (one entry per concurrency level, in `summarize`'s form)."""

    key: str
    label: str
    command: Callable[[int], list[str]]  # the server's command line for a port
    ready_path: str
    model: str  # the `model` field requests carry
    requests: dict[int, int]
    warmup_burst: int  # concurrent warm-up requests, so the first measured batch is not the first of its size
    sample_running: bool = False
    levels: list[dict] = field(default_factory=list)
    error: str | None = None

    def report(self) -> dict:
        return {
            "key": self.key,
            "label": self.label,
            "requests": self.requests,
            "levels": self.levels,
            "error": self.error,
        }


class ServerStartError(RuntimeError):
    pass


@contextlib.contextmanager
def server(command: list[str], ready_path: str, port: int, log_path: Path, timeout_s: float) -> Iterator[str]:
    """Run `command` until the block ends; yields the base URL once `ready_path` answers 200.

    The server runs in its own session, so stopping it reaches only its process group: SIGTERM (a
    graceful shutdown for uvicorn), then SIGKILL after 30 s."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            command, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise ServerStartError(f"exited with code {proc.returncode}; see {log_path}")
                if time.monotonic() > deadline:
                    raise ServerStartError(f"not ready after {timeout_s:.0f}s; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + ready_path, timeout=2).status_code == 200:
                        break
                time.sleep(0.5)
            yield base
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


@dataclass
class RequestResult:
    latency_s: float
    ttft_s: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    """Stream one chat completion; TTFT is the arrival of the first chunk carrying generated text."""
    start = time.perf_counter()
    result = RequestResult(latency_s=0.0)
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if result.ttft_s is None and any(
                        choice.get("delta", {}).get(name)
                        for choice in chunk.get("choices", [])
                        for name in TEXT_FIELDS
                    ):
                        result.ttft_s = time.perf_counter() - start
                    if chunk.get("usage"):
                        result.completion_tokens = chunk["usage"]["completion_tokens"]
                        result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                if not result.completion_tokens:
                    result.error = "the stream ended without usage"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    result.latency_s = time.perf_counter() - start
    return result


async def _sample_running(client: httpx.AsyncClient, base: str, samples: list[float]) -> None:
    """Poll our server's `num_requests_running` gauge: the size of the batch being generated."""
    while True:
        with contextlib.suppress(httpx.HTTPError):
            text = (await client.get(base + "/metrics")).text
            for line in text.splitlines():
                if line.startswith("observe_r1_num_requests_running "):
                    samples.append(float(line.split()[1]))
        await asyncio.sleep(0.25)


@dataclass
class LevelRun:
    """One stretch of requests at one concurrency: a level is measured in several, spread over the run."""

    results: list[RequestResult]
    wall_s: float
    running: list[float]  # samples of the server's running-requests gauge


async def run_level(
    base: str,
    body: Callable[[int], dict],
    concurrency: int,
    n: int,
    timeout_s: float,
    sample_running: bool,
) -> LevelRun:
    """`n` requests, `body(0)` to `body(n - 1)`, from `concurrency` closed-loop clients (each sends
    its next request as soon as its previous one ends)."""
    url = base + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        next_index = iter(range(n))
        results: list[RequestResult] = []

        async def worker() -> None:
            for i in next_index:
                results.append(await one_request(client, url, body(i)))

        running: list[float] = []
        sampler = asyncio.create_task(_sample_running(client, base, running)) if sample_running else None
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
    return LevelRun(results, wall, running)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(concurrency: int, runs: list[LevelRun]) -> dict:
    """A level over all its stretches: throughput is tokens over the summed wall time, percentiles are
    over every request."""
    results = [r for run in runs for r in run.results]
    running = [x for run in runs for x in run.running]
    wall = sum(run.wall_s for run in runs)
    ok = [r for r in results if r.error is None]
    tokens = sum(r.completion_tokens for r in ok)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    errors = [r.error for r in results if r.error is not None]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wall_s": wall,
        "stretches": len(runs),
        "completion_tokens": tokens,
        "mean_completion_tokens": tokens / len(ok) if ok else None,
        "prompt_tokens": ok[0].prompt_tokens if ok else None,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(ok) / wall,
        "latency_p50_s": _percentile([r.latency_s for r in ok], 0.5),
        "latency_p90_s": _percentile([r.latency_s for r in ok], 0.9),
        "ttft_p50_s": _percentile(ttfts, 0.5),
        "mean_running": statistics.fmean(running) if running else None,
        "load_avg_1m": os.getloadavg()[0],
    }
