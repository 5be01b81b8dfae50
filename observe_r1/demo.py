"""`observe-r1 demo`: the whole pipeline on the built-in tiny model, as `make demo` and the CPU image run it.

Build the tiny model and a synthetic set, one chat turn, the SFT warm start, a NeuraLadder built from the
warm-started model's samples (a random model gets every question wrong, so every row would have difficulty 1),
Observe-R1 GRPO on that ladder, then serve the trained model, ask it one question through the openai client and evaluate it on the local suite with
lmms-eval. Each step is the `observe-r1` subcommand a user would type, run in a subprocess (so the core
imports no stage); the first that fails stops the demo with its exit status.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from observe_r1.command import Command

SERVED_NAME = "observe-r1-tiny"
# The ladder step's size: the first LADDER_ROWS questions, LADDER_SAMPLES samples each, short enough to add
# well under a minute; GRPO's 4 steps of 4 prompts need 16 rows, and the filters keep most of these.
LADDER_ROWS = 64
LADDER_SAMPLES = 4


def _train_configs() -> Path:
    """The training stage's packaged configs, found without importing the stage."""
    spec = importlib.util.find_spec("observe_r1_train")
    if spec is None or spec.origin is None:
        raise SystemExit("observe-r1 demo: the training stage (observe_r1_train) is not installed")
    return Path(spec.origin).parent / "configs"


def steps(out: Path, port: int) -> dict[str, list[str]]:
    """The demo's `observe-r1` command lines by step name, in order; `serve` runs beside `ask` and `eval`."""
    configs, data = _train_configs(), out / "data" / "data.jsonl"
    base_url = f"http://127.0.0.1:{port}/v1"
    rows = [f"data.paths=[{data}]"]
    return {
        "tiny-model": ["tiny-model", str(out / "model"), "--size", "tiny", "--seed", "0", "--force"],
        "synth-data": ["synth-data", str(out / "data"), "--n", "200", "--seed", "0", "--force"],
        "chat": ["chat", "--model", str(out / "model"), "--sample", str(data), "--row", "1", "--seed", "0"],
        "sft": [
            "sft",
            "--config",
            str(configs / "sft_tiny_cpu.yaml"),
            f"model.path={out / 'model'}",
            *rows,
            f"checkpoint.output_dir={out / 'sft'}",
        ],
        "ladder": [
            "ladder",
            "--model",
            str(out / "sft" / "model"),
            "--data",
            str(data),
            "--out",
            str(out / "ladder"),
            "--samples",
            str(LADDER_SAMPLES),
            f"input.max_rows={LADDER_ROWS}",
            "sampling.max_new_tokens=64",  # as tiny_cpu.yaml's rollouts
            "sampling.max_prompt_tokens=1024",
        ],
        "train": [
            "train",
            "--config",
            str(configs / "tiny_cpu.yaml"),
            f"model.path={out / 'sft' / 'model'}",
            f"data.paths=[{out / 'ladder' / 'ladder.jsonl'}]",
            f"checkpoint.output_dir={out / 'train'}",
        ],
        "serve": [
            "serve",
            "--model",
            str(out / "train" / "model"),
            "--served-model-name",
            SERVED_NAME,
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        "ask": [
            "ask",
            "--base-url",
            base_url,
            "--model",
            SERVED_NAME,
            "--image",
            str(out / "data" / "images" / "000002.png"),
            "--question",
            "Which bar is the tallest?",
            "--seed",
            "0",
            "--wait-ready",
            "120",
        ],
        "eval": [
            "eval",
            "--suite",
            "local",
            "--model",
            SERVED_NAME,
            "--base-url",
            base_url,
            "--tokenizer",
            str(out / "train" / "model"),
            "--local-data",
            str(data),
            "--limit",
            "16",
            "--max-new-tokens",
            "64",
            "--output",
            str(out / "eval"),
        ],
    }


def _run(argv: list[str]) -> None:
    status = subprocess.run([sys.executable, "-m", "observe_r1.cli", *argv]).returncode
    if status != 0:
        raise SystemExit(status)


def run(args: argparse.Namespace) -> int:
    commands = steps(args.dir, args.port)
    for name in ("tiny-model", "synth-data", "chat"):
        _run(commands[name])
    print("--- SFT warm start on the format, then Observe-R1 GRPO (DeepSpeed ZeRO-2 on CPU)", flush=True)
    for name in ("sft", "ladder", "train", "eval"):  # a demo starts afresh, never resuming an older run
        shutil.rmtree(args.dir / name, ignore_errors=True)
    _run(commands["sft"])
    print(
        "--- the NeuraLadder from the warm-started model's samples, then GRPO on it in ladder order",
        flush=True,
    )
    _run(commands["ladder"])
    _run(commands["train"])
    print("--- serving the trained model and asking it through the openai client", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "observe_r1.cli", *commands["serve"]])
    try:
        _run(commands["ask"])
        print("--- evaluating it on the local suite with lmms-eval", flush=True)
        _run(commands["eval"])
    finally:
        server.terminate()
        server.wait()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=Path("runs/demo"), help="where every step writes")
    parser.add_argument("--port", type=int, default=8765, help="the demo server's port (on 127.0.0.1)")


DEMO = Command(
    help="the whole pipeline on the built-in tiny model (about 5 minutes on a laptop CPU)",
    add_arguments=add_arguments,
    run=run,
)
