"""Serving benchmark: does batching concurrent requests pay off, and how close does it get to the model?

One run measures, on the `small` tiny model with one small image per request and `max_tokens` new
tokens (sampled at temperature 1.0, a seed per request):

- `batched`: `observe-r1 serve` as deployed (`--max-batch-size 32`), at concurrency 1, 8 and 32;
- `baseline`: the same server with `--max-batch-size 1`, i.e. one request at a time;
- `peer`: `transformers serve` on the same weights (it loads a Qwen2.5-VL folder here only through a
  remote-code image-only processor, and generates one request at a time for this architecture);
- `in-process`: `model.generate` on a batch of 1 and of 32 identical prompts, no server at all: the
  ceiling a server can approach; plain, and starting from the cached system turn as the servers do.

Both servers run with the prefix cache on (the default): the baseline differs only in batch size.

Every request streams (so time to first token is measured the same way for every server) and the
completion tokens counted are those each server reports in `usage`. The script builds its own model and
image, starts and stops the servers on free loopback ports, and writes `results.json`, `results.md`
and `throughput.png` into the output folder, each atomically.

This file runs the setups; `workload.py` defines the requests, `drivers.py` defines a setup (`Setup`),
starts servers and drives them (and times in-process `generate`), `report.py` writes the tables and the
plot.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from drivers import (
    REPO,
    LevelRun,
    ServerStartError,
    Setup,
    free_port,
    in_process,
    log,
    merge_in_process,
    run_level,
    server,
    summarize,
)
from report import plot, render_markdown, seconds, targets
from workload import CONCURRENCY, chat_body, make_image, png_data_url

from observe_r1.io import atomic_dir, atomic_write_text

SERVED_NAME = "small"
# Requests per concurrency level. The one-at-a-time servers gain nothing from more requests at high
# concurrency (their throughput does not depend on it), so they get fewer to keep the run short.
BATCHED_REQUESTS = {1: 24, 8: 32, 32: 128}
SEQUENTIAL_REQUESTS = {1: 24, 8: 24, 32: 32}
PEER_REQUESTS = {1: 8, 8: 16, 32: 32}
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


def start_setup(
    stack: contextlib.ExitStack, setup: Setup, image_url: str, args: argparse.Namespace, log_dir: Path
) -> str | None:
    """Start the setup's server (stopped when `stack` closes) and warm it up; its base URL, or None
    when it is skipped or fails (the reason is recorded in the setup)."""
    if setup.error:
        log(f"{setup.label}: skipped: {setup.error}")
        return None
    log(f"starting {setup.label}")
    port = free_port()
    try:
        base = stack.enter_context(
            server(
                setup.command(port), setup.ready_path, port, log_dir / f"{setup.key}.log", args.start_timeout
            )
        )
        start = time.perf_counter()
        warm = [
            drive(setup, base, image_url, args, 1, 2, 10_000),
            drive(setup, base, image_url, args, setup.warmup_burst, setup.warmup_burst, 20_000),
        ]
        failed = next((r.error for run in warm for r in run.results if r.error), None)
        if failed:
            raise ServerStartError(f"warm-up requests failed: {failed}")
    except ServerStartError as e:
        setup.error = str(e)
        log(f"{setup.label}: FAILED: {e}")
        return None
    log(f"{setup.label}: ready and warmed up in {time.perf_counter() - start:.1f}s")
    return base


def drive(
    setup: Setup, base: str, image_url: str, args: argparse.Namespace, concurrency: int, n: int, seed0: int
) -> LevelRun:
    def body(i: int) -> dict:
        return chat_body(setup.model, image_url, seed0 + i, args.max_tokens)

    return asyncio.run(run_level(base, body, concurrency, n, args.request_timeout, setup.sample_running))


def run_level_everywhere(
    live: list[Setup],
    bases: dict[str, str],
    image_url: str,
    args: argparse.Namespace,
    concurrency: int,
    counts: dict[str, int],
    seed0: int,
) -> dict[str, list[LevelRun]]:
    """One level on every server back to back; at concurrency 1 the servers take requests in turn, one
    by one, so a latency comparison is not skewed by the machine's drift."""
    stretches: dict[str, list[LevelRun]] = {s.key: [] for s in live}
    if concurrency > 1:
        for setup in live:
            stretches[setup.key].append(
                drive(setup, bases[setup.key], image_url, args, concurrency, counts[setup.key], seed0)
            )
        return stretches
    for i in range(max(counts.values(), default=0)):
        for setup in (s for s in live if i < counts[s.key]):
            stretches[setup.key].append(drive(setup, bases[setup.key], image_url, args, 1, 1, seed0 + i))
    return stretches


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "serve")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--image-size",
        type=int,
        default=56,
        help="side of the square PNG each request carries (the issue's small image; 224 makes the prefill dominate)",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every level's request count")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed in-process runs per batch size and round"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="measure every level in this many interleaved stretches, so that drift in the machine's "
        "speed reaches every setup alike",
    )
    parser.add_argument("--skip-peer", action="store_true", help="leave out transformers serve")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--start-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


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
    top = max(CONCURRENCY)
    runs: dict[str, dict[int, list[LevelRun]]] = {s.key: {c: [] for c in CONCURRENCY} for s in setups}
    inproc_rounds = []
    with contextlib.ExitStack() as stack:
        bases = {s.key: start_setup(stack, s, image_url, args, out / "logs") for s in setups}
        live = [s for s in setups if bases[s.key]]
        for round_ in range(args.rounds):
            # Each level runs on every server back to back (at concurrency 1, request by request in
            # turn), and in-process generate right after the top level: the numbers a target compares
            # are taken seconds to a minute apart, never a whole run apart.
            for concurrency in CONCURRENCY:
                counts = {
                    s.key: max(concurrency, math.ceil(s.requests[concurrency] / args.rounds)) for s in live
                }
                stretches = run_level_everywhere(
                    live, bases, image_url, args, concurrency, counts, 1000 * concurrency + 100 * round_
                )
                for setup in live:
                    runs[setup.key][concurrency] += stretches[setup.key]
                    level = summarize(concurrency, stretches[setup.key])
                    log(
                        f"round {round_ + 1}/{args.rounds} {setup.label} c={concurrency}: "
                        f"{level['ok']}/{counts[setup.key]} ok, {level['tokens_per_s']:.1f} tok/s, "
                        f"p50 {seconds(level['latency_p50_s'])}, TTFT p50 {seconds(level['ttft_p50_s'])}, "
                        f"{level['wall_s']:.1f}s, load {level['load_avg_1m']:.2f}"
                    )
                if concurrency == top:
                    inproc_rounds.append(
                        in_process(model_dir, image, (1, top), args.max_tokens, args.repeats)
                    )
    for setup in live:
        setup.levels = [summarize(c, runs[setup.key][c]) for c in CONCURRENCY]
    inproc = merge_in_process(inproc_rounds)
    meta["rounds"] = args.rounds

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
