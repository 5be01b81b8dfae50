"""Our server on the vLLM engine against vLLM's own OpenAI server, on vLLM's CPU build.

    .venv-vllm/bin/python bench/vllm_bench.py [--out DIR] [--rounds 3] [--max-tokens 64] [--scale 1]

Both servers serve the tiny text-only Qwen2 of tests/vllm_helpers (the CPU build's Qwen2.5-VL path
needs torchvision) with the same engine settings: float32, eager mode (no compilation), the same
maximum model length and `max_num_seqs`, the same KV-cache size and thread binding
(`VLLM_CPU_KVCACHE_SPACE`, `VLLM_CPU_OMP_THREADS_BIND`). Everything else is each server's own
default: ours as `observe-r1 serve --engine vllm` runs, vLLM's as
`python -m vllm.entrypoints.openai.api_server` runs (the CPU build's `vllm` command fails on its
package name).

Requests: the Observe-R1 system prompt and a question, streamed, temperature 1, top_p 1, the same
seed for the same request on both servers (so both sample the same tokens), `--max-tokens` new
tokens, `ignore_eos` on neither (ours has no such parameter). Ours parses every response into its
observation, reasoning and answer on the way (that is part of what is measured); vLLM's sends the
raw text. Tokens are counted from each server's `usage`. Closed-loop clients at concurrency 1 and
32; each of `--rounds` rounds runs every level on both servers in turn (at concurrency 1, in blocks of
`--block` requests), so a drift of the machine's speed reaches both alike.

Both servers stay up for the whole run, so each waits `--settle-s` seconds before it is measured: after
its last request vLLM's model worker keeps polling its message queue for a second (busy-waiting, to
answer the next step sooner), and on two cores that polling takes a core from whichever server runs
next. Without the pause the measurement is of that polling: request-by-request alternation measured
ours at 0.36-0.58 of vLLM's at concurrency 1, and either server alone measured ours at 1.7.

A third server is vLLM's with ours' process layout (see INPROC_ENV), which isolates the API path.

Target (issue 17): ours / vLLM's tokens per second at least 0.9 at both levels. Writes results.json
and results.md to the output folder, atomically.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

from drivers import REPO, LevelRun, ServerStartError, free_port, log, run_level, server, summarize
from workload import chat_body

from observe_r1.io import atomic_write_text

sys.path.insert(0, str(REPO / "tests"))
from vllm_helpers.tiny_qwen2 import build_tiny_qwen2  # noqa: E402

SERVED_NAME = "tiny"
LEVELS = {1: 24, 32: 192}  # requests per concurrency level, over all rounds
BUSY_LOOP_S = 1.0  # vLLM's shared-memory queue: readers spin this long after their last read
TARGET = 0.9
MAX_PROMPT_TOKENS, MAX_COMPLETION_TOKENS = 1024, 256
# What both servers get, so that only the servers differ: our engine's CPU defaults
# (observe_r1_serve.vllm_engine) for the KV cache and the thread binding.
SHARED_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
SERVERS = {
    "ours": "observe-r1 serve --engine vllm",
    "vllm": "vLLM OpenAI server",
    "vllm-inproc": "vLLM OpenAI server, in-process worker",
}
# Ours answers /health while the model loads and /ready once it is served; vLLM's HTTP server starts
# only once the engine is up.
READY = {"ours": "/ready", "vllm": "/health", "vllm-inproc": "/health"}
# Ours runs vLLM's model worker inside the engine-core process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as
# vLLM does by default on one GPU); on CPU vLLM's server defaults to a worker process of its own. The
# third server is vLLM's with ours' layout, so that its ratio measures the API path alone.
INPROC_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING=0"


def commands(model: Path, port: int) -> dict[str, list[str]]:
    python = sys.executable
    max_len = str(MAX_PROMPT_TOKENS + MAX_COMPLETION_TOKENS)
    ours = [python, "-m", "observe_r1.cli", "serve", "--model", str(model), "--engine", "vllm"]
    ours += ["--served-model-name", SERVED_NAME, "--port", str(port), "--log-level", "warning"]
    ours += [
        "--max-prompt-tokens",
        str(MAX_PROMPT_TOKENS),
        "--max-completion-tokens",
        str(MAX_COMPLETION_TOKENS),
    ]
    ours += ["--max-batch-size", "32", "--dtype", "fp32"]
    plain = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    plain += ["--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port)]
    plain += ["--dtype", "float32", "--enforce-eager", "--max-model-len", max_len, "--max-num-seqs", "32"]
    plain += ["--disable-log-stats", "--uvicorn-log-level", "warning"]
    return {"ours": ours, "vllm": plain, "vllm-inproc": ["env", INPROC_ENV, *plain]}


def drive(base: str, concurrency: int, n: int, seed0: int, args: argparse.Namespace) -> LevelRun:
    def body(i: int) -> dict:
        return chat_body(SERVED_NAME, None, seed0 + i, args.max_tokens)

    return asyncio.run(run_level(base, body, concurrency, n, args.request_timeout, False))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "vllm")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every level's request count")
    p.add_argument("--only", choices=list(SERVERS), nargs="+", help="run these servers alone (to profile)")
    p.add_argument("--block", type=int, default=4, help="concurrency-1 requests per turn of a server")
    p.add_argument(
        "--settle-s",
        type=float,
        default=2 * BUSY_LOOP_S,
        help="pause before each turn, so the other server's polling has stopped",
    )
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--start-timeout", type=float, default=300.0)
    return p.parse_args(argv)


def report(meta: dict, levels: dict, ratios: dict) -> str:
    lines = [
        f"Our server on the vLLM engine against vLLM's OpenAI server: vLLM's CPU build, the tiny text"
        f" Qwen2, {meta['max_tokens']} new tokens, {meta['rounds']} interleaved rounds,"
        f" {meta['cpus']} CPUs, load average {meta['load_avg_start']:.2f} at the start; {meta['started']}."
        f" Concurrency 1 in turns of {meta['block']} requests; {meta['settle_s']:g} s pause before each turn.",
        "",
        "| server | concurrency | requests | tok/s | mean tokens | p50 latency s | TTFT p50 s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, by_level in levels.items():
        for c, lv in by_level.items():
            lines.append(
                f"| {SERVERS[key]} | {c} | {lv['ok']} | {lv['tokens_per_s']:.1f}"
                f" | {lv['mean_completion_tokens']:.1f} | {lv['latency_p50_s']:.3f} | {lv['ttft_p50_s']:.3f} |"
            )
    lines.append("")
    for peer, by_level in ratios.items():
        target = f" (target >= {TARGET})" if peer == "vllm" else " (like for like: the API path alone)"
        for c, r in by_level.items():
            lines.append(f"- c={c}: ours / {SERVERS[peer]}'s tokens per second {r:.3f}{target}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = build_tiny_qwen2(out / "model", seed=0, overwrite=True)
    for key, value in SHARED_ENV.items():
        os.environ.setdefault(key, value)
    meta = {
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "load_avg_start": os.getloadavg()[0],
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "env": SHARED_ENV,
        "block": args.block,
        "settle_s": args.settle_s,
    }
    keys = args.only or list(SERVERS)
    runs: dict[str, dict[int, list[LevelRun]]] = {k: {c: [] for c in LEVELS} for k in keys}
    with contextlib.ExitStack() as stack:
        bases = {}
        for key in keys:
            port = free_port()
            log(f"starting {SERVERS[key]}")
            try:
                bases[key] = stack.enter_context(
                    server(
                        commands(model, port)[key], READY[key], port, out / f"{key}.log", args.start_timeout
                    )
                )
            except ServerStartError as e:
                log(f"{SERVERS[key]}: FAILED: {e}")
                return 1
            warm = drive(bases[key], 32, 64, 10_000, args)
            if any(r.error for r in warm.results):
                log(f"{SERVERS[key]}: warm-up failed: {next(r.error for r in warm.results if r.error)}")
                return 1
        meta["commands"] = {k: " ".join(commands(model, 0)[k]) for k in keys}
        for round_ in range(args.rounds):
            for c, total in LEVELS.items():
                n = max(c, math.ceil(total * args.scale / args.rounds))
                seed0 = 1000 * c + 100 * round_
                if c == 1:  # in blocks, in turn
                    for start in range(0, n, args.block):
                        for key in keys:
                            time.sleep(args.settle_s)
                            for i in range(start, min(n, start + args.block)):
                                runs[key][c].append(drive(bases[key], 1, 1, seed0 + i, args))
                else:
                    for key in keys:
                        time.sleep(args.settle_s)
                        runs[key][c].append(drive(bases[key], c, n, seed0, args))
                for key in keys:
                    lv = summarize(c, runs[key][c][-n if c == 1 else -1 :])
                    log(
                        f"round {round_ + 1} {SERVERS[key]} c={c}: {lv['tokens_per_s']:.1f} tok/s, {lv['ok']} ok"
                    )
    levels = {k: {c: summarize(c, runs[k][c]) for c in LEVELS} for k in keys}
    ratios = {
        peer: {c: levels["ours"][c]["tokens_per_s"] / levels[peer][c]["tokens_per_s"] for c in LEVELS}
        for peer in keys
        if peer != "ours" and "ours" in keys
    }
    meta["load_avg_end"] = os.getloadavg()[0]
    results = {"meta": meta, "levels": levels, "ratios": ratios, "target": TARGET}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    text = report(meta, levels, ratios)
    atomic_write_text(out / "results.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
