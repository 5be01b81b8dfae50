"""Serving benchmark: does batching concurrent requests pay off, and how close does it get to the model?

One run measures, on the `small` tiny model with one small image per request and `max_tokens` new
tokens (sampled at temperature 1.0, a seed per request):

- `batched`: `observe-r1 serve` as deployed (`--max-batch-size 32`), at concurrency 1, 8 and 32;
- `baseline`: the same server with `--max-batch-size 1`, i.e. one request at a time;
- `peer`: `transformers serve` on the same weights (it loads a Qwen2.5-VL folder here only through a
  remote-code image-only processor, and generates one request at a time for this architecture);
- `in-process`: `model.generate` on a batch of 1 and of 32 identical prompts, no server at all: the
  ceiling a server can approach.

Every request streams (so time to first token is measured the same way for every server) and the
completion tokens counted are those each server reports in `usage`. The script builds its own model and
image, starts and stops the servers on free loopback ports, and writes `results.json`, `results.md`
and `throughput.png` into the output folder, each atomically.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from observe_r1.chat import build_messages
from observe_r1.format import SYSTEM_PROMPT
from observe_r1.io import atomic_dir, atomic_write_text

REPO = Path(__file__).resolve().parent.parent
SERVED_NAME = "small"
QUESTION = "How many circles are in the image? Answer with a single number."
CONCURRENCY = (1, 8, 32)
# Requests per concurrency level. The one-at-a-time servers gain nothing from more requests at high
# concurrency (their throughput does not depend on it), so they get fewer to keep the run short.
BATCHED_REQUESTS = {1: 24, 8: 32, 32: 128}
SEQUENTIAL_REQUESTS = {1: 24, 8: 24, 32: 32}
PEER_REQUESTS = {1: 8, 8: 16, 32: 32}
TEXT_FIELDS = ("content", "reasoning", "reasoning_content", "observation")
# The peer loads this processor as remote code: Qwen2.5-VL's stock processor needs torchvision for its
# video processor; a signature without `video_processor` makes transformers skip it (as
# `observe_r1.modeling._image_only_class` does in-process).
PEER_PROCESSOR_MODULE = "processing_image_only"
PEER_PROCESSOR_CODE = '''"""Qwen2.5-VL's processor without its video processor, which needs torchvision."""

from transformers import Qwen2_5_VLProcessor


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )
'''


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- inputs


def make_image(size: int):
    """A deterministic picture of a few circles and squares (compressible, like a real chart)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    step = size // 4
    for i in range(3):
        x = step // 2 + i * step
        draw.ellipse((x, step // 2, x + step // 2, step), fill=("red", "green", "blue")[i])
        draw.rectangle((x, 2 * step, x + step // 2, 2 * step + step // 2), fill="orange")
    return img


def png_data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(model: str, image_url: str, seed: int, max_tokens: int) -> dict:
    """One streamed request. The system prompt is sent explicitly so every server (ours would add it
    itself, the peer would not) sees the same prompt as the in-process run."""
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": QUESTION},
                ],
            },
        ],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def build_peer_model(model_dir: Path, dest: Path) -> Path:
    """A copy of `model_dir` that `transformers serve --trust-remote-code` can load without torchvision."""
    with atomic_dir(dest, overwrite=True) as staging:
        shutil.copytree(model_dir, staging, dirs_exist_ok=True)
        (staging / f"{PEER_PROCESSOR_MODULE}.py").write_text(PEER_PROCESSOR_CODE)
        config_path = staging / "preprocessor_config.json"
        config = json.loads(config_path.read_text())
        config["auto_map"] = {"AutoProcessor": f"{PEER_PROCESSOR_MODULE}.Qwen2_5_VLImageOnlyProcessor"}
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return dest


# ------------------------------------------------------------------------------------------ in-process


def in_process(model_dir: Path, image, batches: tuple[int, ...], max_tokens: int, repeats: int) -> dict:
    """Tokens/s of `generate` alone (inputs prepared beforehand), exactly `max_tokens` per row: the
    median of `repeats` timed runs after one warm-up run per batch size (the first call is ~4x slower).
    Runs of one new token time the prefill (vision encoder and prompt) on its own, which shows how
    much of a batch's time batching cannot share out on a CPU."""
    import torch

    from observe_r1.modeling import load_model, load_processor

    model = load_model(model_dir)
    processor = load_processor(model_dir)
    prompt = processor.apply_chat_template(
        build_messages(QUESTION, 1), add_generation_prompt=True, tokenize=False
    )

    def timed(inputs: dict, new_tokens: int, seed: int) -> tuple[float, int]:
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.inference_mode():
            ids = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
            )
        return time.perf_counter() - start, ids.shape[0] * (ids.shape[1] - inputs["input_ids"].shape[1])

    out = {}
    for batch in batches:
        start = time.perf_counter()
        inputs = processor(text=[prompt] * batch, images=[image] * batch, return_tensors="pt")
        preprocess_s = time.perf_counter() - start
        timed(inputs, max_tokens, 0)
        runs = [timed(inputs, max_tokens, seed) for seed in range(1, repeats + 1)]
        rates = [tokens / seconds for seconds, tokens in runs]
        out[batch] = {
            "tokens_per_s": statistics.median(rates),
            "runs_tokens_per_s": rates,
            "batch_s": statistics.median(seconds for seconds, _ in runs),
            "prefill_s": statistics.median(timed(inputs, 1, seed)[0] for seed in range(repeats)),
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "preprocess_s": preprocess_s,
        }
        row = out[batch]
        log(
            f"in-process batch {batch}: {row['tokens_per_s']:.1f} tok/s, {row['batch_s']:.2f}s per batch "
            f"of which prefill {row['prefill_s']:.2f}s (runs: {', '.join(f'{r:.1f}' for r in rates)} tok/s)"
        )
    return out


# ---------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# ----------------------------------------------------------------------------------------------- client


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


async def run_level(
    base: str,
    model: str,
    image_url: str,
    concurrency: int,
    n: int,
    max_tokens: int,
    timeout_s: float,
    seed0: int,
    sample_running: bool,
) -> dict:
    """`n` requests from `concurrency` closed-loop clients (each sends its next request as soon as
    its previous one ends); throughput is over the level's wall time."""
    url = base + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        next_index = iter(range(n))
        results: list[RequestResult] = []

        async def worker() -> None:
            for i in next_index:
                results.append(
                    await one_request(client, url, chat_body(model, image_url, seed0 + i, max_tokens))
                )

        running: list[float] = []
        sampler = asyncio.create_task(_sample_running(client, base, running)) if sample_running else None
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
    return summarize(results, wall, concurrency, running)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(results: list[RequestResult], wall: float, concurrency: int, running: list[float]) -> dict:
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


# ------------------------------------------------------------------------------------------------ setups


@dataclass
class Setup:
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


def our_server(max_batch_size: int, key: str, label: str, model_dir: Path, requests: dict[int, int]) -> Setup:
    def command(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "observe_r1.cli",
            "serve",
            "--model",
            str(model_dir),
            "--engine",
            "transformers",
            "--port",
            str(port),
            "--served-model-name",
            SERVED_NAME,
            "--max-batch-size",
            str(max_batch_size),
            "--log-level",
            "warning",
        ]

    return Setup(key, label, command, "/ready", SERVED_NAME, requests, max_batch_size, sample_running=True)


def peer_server(model_dir: Path, requests: dict[int, int]) -> Setup:
    def command(port: int) -> list[str]:
        return [
            str(Path(sys.executable).with_name("transformers")),
            "serve",
            str(model_dir),
            "--trust-remote-code",
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]

    # The model loads before the HTTP server starts, so `/health` answering means ready.
    setup = Setup("peer", "transformers serve", command, "/health", str(model_dir), requests, 1)
    if importlib.util.find_spec("accelerate") is None:
        setup.error = "accelerate is not installed (transformers serve loads with a device_map)"
    return setup


def scaled(requests: dict[int, int], scale: float) -> dict[int, int]:
    return {c: max(c, round(n * scale)) for c, n in requests.items()}


def run_setup(setup: Setup, image_url: str, args: argparse.Namespace, log_dir: Path) -> None:
    if setup.error:
        log(f"{setup.label}: skipped: {setup.error}")
        return
    log(f"starting {setup.label}")
    port = free_port()
    try:
        with server(
            setup.command(port), setup.ready_path, port, log_dir / f"{setup.key}.log", args.start_timeout
        ) as base:

            def level(concurrency: int, n: int, seed0: int) -> dict:
                return asyncio.run(
                    run_level(
                        base,
                        setup.model,
                        image_url,
                        concurrency,
                        n,
                        args.max_tokens,
                        args.request_timeout,
                        seed0,
                        setup.sample_running,
                    )
                )

            start = time.perf_counter()
            warm = [level(1, 2, 10_000), level(setup.warmup_burst, setup.warmup_burst, 20_000)]
            failed = next((w["first_error"] for w in warm if w["errors"]), None)
            if failed:
                raise ServerStartError(f"warm-up requests failed: {failed}")
            log(f"{setup.label}: ready and warmed up in {time.perf_counter() - start:.1f}s")
            for concurrency, n in setup.requests.items():
                result = level(concurrency, n, 1000 * concurrency)
                setup.levels.append(result)
                log(
                    f"{setup.label} c={concurrency}: {result['ok']}/{n} ok, {result['tokens_per_s']:.1f} tok/s, "
                    f"{result['requests_per_s']:.2f} req/s, p50 {_s(result['latency_p50_s'])}, "
                    f"p90 {_s(result['latency_p90_s'])}, TTFT p50 {_s(result['ttft_p50_s'])}, "
                    f"{result['wall_s']:.1f}s, load {result['load_avg_1m']:.2f}"
                )
    except ServerStartError as e:
        setup.error = str(e)
        log(f"{setup.label}: FAILED: {e}")


# ------------------------------------------------------------------------------------------------ report


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _level(setups: list[Setup], key: str, concurrency: int) -> dict | None:
    setup = next((s for s in setups if s.key == key), None)
    return next((lv for lv in setup.levels if lv["concurrency"] == concurrency), None) if setup else None


def targets(setups: list[Setup], inproc: dict) -> list[dict]:
    """The three goals with their measured values (None where a setup failed), then context: the peer,
    and the in-process ratio that bounds what any batching server can gain over one-at-a-time here."""
    top = max(CONCURRENCY)

    def value(key: str, concurrency: int, metric: str) -> float | None:
        level = _level(setups, key, concurrency)
        return level[metric] if level else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    batched = value("batched", top, "tokens_per_s")
    ceiling, single = inproc.get(top), inproc.get(1)
    rows = [
        (
            f"throughput at c={top}: batched / one-at-a-time baseline",
            ">= 5.0",
            ratio(batched, value("baseline", top, "tokens_per_s")),
            lambda v: v >= 5.0,
        ),
        (
            f"throughput: batched at c={top} / in-process generate at batch {top}",
            ">= 0.70",
            ratio(batched, ceiling and ceiling["tokens_per_s"]),
            lambda v: v >= 0.7,
        ),
        (
            "latency p50 at c=1: batched / baseline",
            "<= 1.05 (no worse, within noise)",
            ratio(value("batched", 1, "latency_p50_s"), value("baseline", 1, "latency_p50_s")),
            lambda v: v <= 1.05,
        ),
        (
            f"throughput at c={top}: batched / transformers serve",
            "(context)",
            ratio(batched, value("peer", top, "tokens_per_s")),
            None,
        ),
        (
            f"in-process generate: batch {top} / batch 1 (the most batching can gain here)",
            "(context)",
            ratio(ceiling and ceiling["tokens_per_s"], single and single["tokens_per_s"]),
            None,
        ),
        (
            f"in-process generate: prefill share of a batch of {top}",
            "(context)",
            ratio(ceiling and ceiling["prefill_s"], ceiling and ceiling["batch_s"]),
            None,
        ),
    ]
    return [
        {"name": name, "target": target, "value": v, "met": None if check is None or v is None else check(v)}
        for name, target, v, check in rows
    ]


def render_markdown(meta: dict, setups: list[Setup], inproc: dict, goals: list[dict]) -> str:
    lines = [
        "# Serving benchmark",
        "",
        f"Model `small` (Qwen2.5-VL architecture, random weights), one {meta['image_size']}x{meta['image_size']} "
        f"PNG per request, `max_tokens={meta['max_tokens']}`, temperature 1.0, streamed; {meta['cpus']} CPU cores, "
        f"load average {meta['load_avg_start']:.2f} at the start and {meta['load_avg_end']:.2f} at the end. "
        "Latency is end to end; TTFT is the first chunk carrying text; tokens/s counts the completion tokens "
        "each server reports. In-process rows: latency is one batch's `generate`, TTFT its prefill (one new token).",
        "",
        "| setup | concurrency | requests ok | tokens/s | req/s | latency p50 | latency p90 | TTFT p50 | mean batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for setup in setups:
        if setup.error:
            lines.append(f"| {setup.label} | - | failed: {setup.error} | | | | | | |")
        for lv in setup.levels:
            batch = "-" if lv["mean_running"] is None else f"{lv['mean_running']:.1f}"
            lines.append(
                f"| {setup.label} | {lv['concurrency']} | {lv['ok']}/{lv['requests']} | {lv['tokens_per_s']:.1f} | "
                f"{lv['requests_per_s']:.2f} | {_s(lv['latency_p50_s'])} | {_s(lv['latency_p90_s'])} | "
                f"{_s(lv['ttft_p50_s'])} | {batch} |"
            )
    for batch, row in inproc.items():
        lines.append(
            f"| in-process generate | batch {batch} | - | {row['tokens_per_s']:.1f} | {batch / row['batch_s']:.2f} | "
            f"{_s(row['batch_s'])} | | {_s(row['prefill_s'])} | {batch} |"
        )
    lines += ["", "| ratio | target | value | met |", "|---|---|---:|---|"]
    for goal in goals:
        value = "-" if goal["value"] is None else f"{goal['value']:.2f}"
        met = {True: "yes", False: "NO", None: "-"}[goal["met"]]
        lines.append(f"| {goal['name']} | {goal['target']} | {value} | {met} |")
    lines += ["", "Mean batch: the server's `num_requests_running` gauge sampled every 0.25 s.", ""]
    return "\n".join(lines)


def plot(path: Path, setups: list[Setup], inproc: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for setup in setups:
        if setup.levels:
            xs = [lv["concurrency"] for lv in setup.levels]
            ax.plot(xs, [lv["tokens_per_s"] for lv in setup.levels], marker="o", label=setup.label)
    for batch, row in inproc.items():
        ax.axhline(
            row["tokens_per_s"],
            linestyle="--",
            color="gray" if batch == 1 else "black",
            linewidth=1,
            label=f"in-process generate, batch {batch}",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(CONCURRENCY), [str(c) for c in CONCURRENCY])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("completion tokens / s")
    ax.set_title("Throughput vs concurrency (small model, CPU)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "serve")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every level's request count")
    parser.add_argument("--repeats", type=int, default=3, help="timed in-process runs per batch size")
    parser.add_argument("--skip-peer", action="store_true", help="leave out transformers serve")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--start-timeout", type=float, default=180.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:
        print(
            "serve_bench: matplotlib is needed for the plot: pip install 'matplotlib>=3.8'", file=sys.stderr
        )
        return 2
    from observe_r1 import tiny_model

    out = args.out.resolve()
    load = os.getloadavg()[0]
    busy = " (busy: results will be noisy; re-run on an idle machine)" if load > 0.5 else ""
    log(f"load average {load:.2f} on {os.cpu_count()} cores{busy}")
    model_dir = tiny_model.build(out / "model", size="small", seed=0, overwrite=True)
    image = make_image(args.image_size)
    image_url = png_data_url(image)
    meta = {
        "model": "small",
        "max_tokens": args.max_tokens,
        "image_size": args.image_size,
        "cpus": os.cpu_count(),
        "load_avg_start": load,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    inproc = in_process(model_dir, image, (1, max(CONCURRENCY)), args.max_tokens, args.repeats)
    setups = [
        our_server(
            32, "batched", "observe-r1 serve (batched, 32)", model_dir, scaled(BATCHED_REQUESTS, args.scale)
        ),
        our_server(
            1,
            "baseline",
            "observe-r1 serve (one at a time)",
            model_dir,
            scaled(SEQUENTIAL_REQUESTS, args.scale),
        ),
    ]
    if not args.skip_peer:
        setups.append(
            peer_server(build_peer_model(model_dir, out / "peer-model"), scaled(PEER_REQUESTS, args.scale))
        )
    for setup in setups:
        run_setup(setup, image_url, args, out / "logs")

    goals = targets(setups, inproc)
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta["load_avg_end"] = os.getloadavg()[0]
    results = {"meta": meta, "in_process": inproc, "setups": [s.report() for s in setups], "targets": goals}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", render_markdown(meta, setups, inproc, goals))
    plot(out / "throughput.png", setups, inproc)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'throughput.png'}")
    for goal in goals:
        value = "-" if goal["value"] is None else f"{goal['value']:.2f}"
        log(f"{goal['name']}: {value} (target {goal['target']}, met: {goal['met']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
