"""Running lmms-eval: its environment, the command for one task, and reading what it wrote.

lmms-eval lives in its own virtual environment (.venv-eval, `make setup-eval`): its install pulls a
torchvision that breaks transformers here and a math-verify that differs from ours (docs/architecture.md). So it is
always a subprocess, one per task, which is also what makes a restarted run skip finished tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from observe_r1.errors import UserError
from observe_r1.format import DEFAULT_VARIANT

REPO = Path(__file__).resolve().parent.parent
PYTHON_ENV = "OBSERVE_R1_LMMS_PYTHON"
FAILURE_MARKERS = ("[LMMS_EVAL_REQUEST_FAILED", "[LMMS_EVAL_BUDGET_EXCEEDED]")
BACKENDS = ("openai", "vllm")


class EvalError(UserError, RuntimeError):
    """A run that must stop with a message and a non-zero exit, never with a partial report."""


def lmms_python() -> Path:
    """The Python of lmms-eval's environment: $OBSERVE_R1_LMMS_PYTHON, else the repository's .venv-eval."""
    path = Path(os.environ.get(PYTHON_ENV) or REPO / ".venv-eval" / "bin" / "python")
    if not path.exists():
        raise EvalError(
            f"lmms-eval's environment not found at {path}: run `make setup-eval` or set {PYTHON_ENV}"
        )
    return path


def check_tasks(python: Path, include_path: Path, tasks: list[str], env: dict[str, str]) -> dict[str, str]:
    """What keeps each of `tasks` from loading in lmms-eval's environment (eval/task_check.py: its YAML,
    its functions and the modules its code imports, without its data); tasks that load are left out.
    About 20 s: lmms-eval reads every task's YAML first."""
    script = Path(__file__).with_name("task_check.py")
    proc = subprocess.run(
        [str(python), str(script), str(include_path), *tasks],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    if proc.returncode != 0:
        raise EvalError(f"could not load lmms-eval's tasks with {python}:\n{proc.stderr[-3000:]}")
    problems = json.loads(proc.stdout.strip().splitlines()[-1])
    return {task: problem for task, problem in problems.items() if problem}


@dataclass(frozen=True)
class Target:
    """What lmms-eval evaluates: a server (`openai`) or a checkpoint it loads itself (`vllm`)."""

    backend: str
    model: str
    base_url: str | None = None
    model_args: str = ""  # extra key=value pairs for lmms-eval's model
    format_variant: str = DEFAULT_VARIANT  # the system prompt our model class sends (openai backend)


def command(
    python: Path,
    task: str,
    target: Target,
    include_path: Path,
    out_dir: Path,
    reasoning_tags: list[list[str]],
    limit: int | None = None,
    max_new_tokens: int | None = None,
) -> list[str]:
    """The lmms-eval command line for one task, logging every sample (the report reads the raw text)."""
    if target.backend == "openai":
        model = "observe_r1"
        args = f"model={target.model},base_url={target.base_url},format_variant={target.format_variant}"
    elif target.backend == "vllm":
        model, args = "vllm", f"model={target.model}"
    else:
        raise ValueError(f"unknown backend '{target.backend}': expected one of {', '.join(BACKENDS)}")
    if target.model_args:
        args += f",{target.model_args}"
    cmd = [str(python), "-m", "lmms_eval", "--model", model, "--model_args", args, "--tasks", task]
    cmd += ["--output_path", str(out_dir), "--log_samples", "--reasoning_tags", json.dumps(reasoning_tags)]
    cmd += ["--include_path", str(include_path)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    if max_new_tokens is not None:
        cmd += ["--gen_kwargs", f"max_new_tokens={max_new_tokens}"]
    return cmd


def run(cmd: list[str], log_path: Path, env: dict[str, str]) -> None:
    """Run lmms-eval with its output passing through to ours and into `log_path`.

    Raises EvalError with the end of its output when it fails; an interrupt stops it before re-raising.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[bytes] = deque(maxlen=60)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            while chunk := os.read(proc.stdout.fileno(), 65536):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
                tail.extend(chunk.splitlines(keepends=True))
            code = proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    if code != 0:
        text = b"".join(tail).decode(errors="replace")[-4000:]
        raise EvalError(f"lmms-eval exited with {code} (full log: {log_path}); its last output:\n{text}")


def outputs(out_dir: Path, task: str) -> tuple[Path, Path]:
    """The results file and the logged samples of `task` that lmms-eval wrote under `out_dir`."""
    results = sorted(out_dir.rglob("*_results.json"))
    samples = sorted(out_dir.rglob(f"*_samples_{task}.jsonl"))
    if not results or not samples:
        raise EvalError(
            f"lmms-eval wrote no results or no logged samples for '{task}' (its log: {out_dir / 'lmms-eval.log'})"
        )
    return results[-1], samples[-1]


def accuracy(results_path: Path, task: str, metric: str | None) -> tuple[str, float]:
    """`metric` of `task` as lmms-eval aggregated it (its first metric when None), with the metric's name."""
    scores = json.loads(results_path.read_text())["results"].get(task)
    if scores is None:
        raise EvalError(f"{results_path} has no results for '{task}'")
    values = {k.split(",")[0]: v for k, v in scores.items() if "," in k and "_stderr" not in k}
    name = metric or next(iter(values), None)
    if name not in values or not isinstance(values[name], (int, float)):
        raise EvalError(f"{results_path}: '{task}' has no numeric metric '{name}' (it has {sorted(values)})")
    return name, float(values[name])


def responses(samples_path: Path) -> list[str]:
    """The raw model response of each logged sample (the first one where a task asked for several).

    `resps` is the response before lmms-eval strips the reasoning tags, `filtered_resps` after; lmms-eval
    leaves `resps` out when the two are equal (a response without those tags).
    """
    out = []
    for line in samples_path.read_text().splitlines():
        sample = json.loads(line)
        resps = sample.get("resps", sample["filtered_resps"])
        while isinstance(resps, list):
            resps = resps[0] if resps else ""
        out.append(resps)
    return out


def scores(samples_path: Path, metric: str) -> dict[str, float]:
    """Each logged sample's `metric`, keyed by its document's index and a hash of its question and
    images, so that two runs of the same task on the same rows can be compared question by question
    (lmms-eval's own `doc_hash` is one value for every document of a task that maps its documents)."""
    out = {}
    for line in samples_path.read_text().splitlines():
        sample = json.loads(line)
        content = json.dumps([sample.get("input"), sample.get("input_media")]).encode()
        out[f"{sample['doc_id']}:{hashlib.blake2b(content, digest_size=6).hexdigest()}"] = float(sample[metric])
    return out


def failures(texts: list[str]) -> list[str]:
    """The responses that are lmms-eval's placeholders for a request that failed, not model output."""
    return [t for t in texts if t.lstrip().startswith(FAILURE_MARKERS)]
