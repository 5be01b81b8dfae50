"""One cell-seed: `observe-r1 train` (resuming its own checkpoint), then `observe-r1 serve` on the export
and `observe-r1 eval` against it, then its results in done.json. Each is the subcommand a user would run,
in a subprocess (so DeepSpeed launches as in a user's run), with its output in a log beside it.

A stop of the runner (Ctrl-C, SIGTERM) reaches the training run as SIGTERM, which checkpoints after the
step under way; the next sitting resumes there. An eval that did not finish is started afresh.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from observe_r1.errors import UserError
from observe_r1.io import atomic_write_text
from observe_r1.net import free_port, wait_ready
from observe_r1_eval import lmms
from observe_r1_train.ablate.plan import JOB, Job
from observe_r1_train.ablate.spec import EvalSpec, fill
from observe_r1_train.tracking import METRICS_FILE, read_jsonl

SERVED_NAME = "ablate"
LENGTH_PARTS = ("observation", "reasoning", "answer")


class CommandFailed(UserError, RuntimeError):
    """A subcommand (a prepare step, train, eval) failed; the message names it and its log."""


def observe_r1(argv: list[str] | tuple[str, ...]) -> list[str]:
    """The process argv of `observe-r1 ARGV` in this environment."""
    return [sys.executable, "-m", "observe_r1.cli", *argv]


def run_logged(argv: list[str], log: Path) -> int:
    """Run `observe-r1 ARGV` with its output appended to `log`; returns its exit status. If this process
    is stopped meanwhile, the child gets SIGTERM (training checkpoints on it) and is waited for."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        proc = subprocess.Popen(observe_r1(argv), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise


def check_job_file(job: Job) -> None:
    """Record what the cell-seed runs, or refuse a folder that a different command line started."""
    path = job.dir / JOB
    record = {"cell": job.cell, "seed": job.seed, "train": list(job.train_argv)}
    if path.is_file():
        before = json.loads(path.read_text())
        if before != record:
            raise UserError(
                f"{job.label}: {job.dir} was started with another command line than the matrix gives now"
                f" ({before['train']} against {record['train']}); delete {job.dir} to run it again"
            )
        return
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def train(job: Job) -> None:
    """Train (or resume) until the export exists."""
    if (job.model_dir / "config.json").is_file():
        return
    status = run_logged(list(job.train_argv), job.dir / "train.log")
    if status != 0:
        raise CommandFailed(
            f"{job.label}: observe-r1 train failed (exit {status}); see {job.dir / 'train.log'}"
        )
    if not (job.model_dir / "config.json").is_file():
        raise CommandFailed(f"{job.label}: training stopped before its end (a signal?); run again to resume")


def serve_argv(spec: EvalSpec, job: Job, port: int) -> list[str]:
    """`observe-r1 serve` of the cell-seed's export on 127.0.0.1:`port`, with the format (system prompt
    and parser) the cell trained with."""
    argv = ["serve", "--model", str(job.model_dir), "--served-model-name", SERVED_NAME]
    argv += ["--format-variant", job.format_variant]
    return [*argv, "--port", str(port), "--log-level", "warning", *spec.serve_args]


def eval_argv(spec: EvalSpec, job: Job, base_url: str, out: Path) -> list[str]:
    """`observe-r1 eval` of the served export on the held-out set, its format rate and lengths read in
    the cell's format."""
    argv = ["eval", *(["--suite", spec.suite] if spec.suite else ["--tasks", ",".join(spec.tasks)])]
    argv += ["--format-variant", job.format_variant]
    argv += ["--model", SERVED_NAME, "--base-url", base_url, "--tokenizer", str(job.model_dir)]
    argv += ["--output", str(job.eval_dir)]
    if spec.data is not None:
        argv += ["--local-data", fill(str(spec.data), out)]
    if spec.limit is not None:
        argv += ["--limit", str(spec.limit)]
    if spec.max_new_tokens is not None:
        argv += ["--max-new-tokens", str(spec.max_new_tokens)]
    return argv


def evaluate(spec: EvalSpec, job: Job, out: Path) -> dict:
    """Serve the export on a free loopback port, evaluate it, stop the server; returns report.json."""
    report = job.eval_dir / "report.json"
    if not report.is_file():
        shutil.rmtree(job.eval_dir, ignore_errors=True)  # its tasks' settings held the old server's port
        port = free_port()
        with open(job.dir / "serve.log", "ab") as log:
            server = subprocess.Popen(
                observe_r1(serve_argv(spec, job, port)),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            base_url = f"http://127.0.0.1:{port}/v1"
            wait_ready(base_url, spec.ready_timeout_s, alive=lambda: server.poll() is None)
            status = run_logged(eval_argv(spec, job, base_url, out), job.dir / "eval.log")
        finally:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if status != 0:
            raise CommandFailed(
                f"{job.label}: observe-r1 eval failed (exit {status}); see {job.dir / 'eval.log'}"
            )
    return json.loads(report.read_text())


def weighted(rows: list[dict], value) -> float:
    """The mean of `value(row)` over the report's benchmarks, each weighted by its samples."""
    total = sum(r["samples"] for r in rows)
    return sum(r["samples"] * value(r) for r in rows) / total if total else float("nan")


def eval_results(report: dict) -> dict:
    """The held-out part of done.json: accuracy, format rate and mean part lengths (over every benchmark
    of the report, weighted by its samples), per benchmark, and every question's score (keyed
    `task/document hash`) for the paired comparison with the baseline."""
    rows = report["benchmarks"]
    questions = {
        f"{r['task']}/{doc}": score
        for r in rows
        for doc, score in lmms.scores(Path(r["samples_file"]), r["metric"]).items()
    }
    return {
        "metrics": {
            "accuracy": weighted(rows, lambda r: r["accuracy"]),
            "format_rate": weighted(rows, lambda r: r["format_rate"]),
            **{f"{p}_tokens": weighted(rows, lambda r, p=p: r["tokens"][p]["mean"]) for p in LENGTH_PARTS},
        },
        "benchmarks": {r["task"]: {"samples": r["samples"], "accuracy": r["accuracy"]} for r in rows},
        "questions": questions,
    }


def results(job: Job, report: dict, reward_window: int) -> dict:
    """What done.json holds: `eval_results`, the mean `reward/total` of the last `reward_window` logged
    steps, the steps trained and the reward curve."""
    held_out = eval_results(report)
    metrics = read_jsonl(job.train_dir / METRICS_FILE)
    rewards = [r["reward/total"] for r in metrics if "reward/total" in r]
    tail = rewards[-reward_window:]
    held_out["metrics"]["reward_end"] = sum(tail) / len(tail) if tail else float("nan")
    return {
        "cell": job.cell,
        "seed": job.seed,
        "steps": metrics[-1]["step"] if metrics else 0,
        **held_out,
        "reward_curve": [[r["step"], r["reward/total"]] for r in metrics if "reward/total" in r],
    }


def run_baseline(job: Job, spec_eval: EvalSpec, out: Path) -> dict:
    """Serve and evaluate the start model as it is, then write its done.json (atomically, last)."""
    job.dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    done = {"model": str(job.model_dir), **eval_results(evaluate(spec_eval, job, out))}
    done["seconds"] = {"eval": round(time.monotonic() - started, 1)}
    atomic_write_text(job.done_file, json.dumps(done, indent=2) + "\n")
    return done


def run_job(job: Job, spec_eval: EvalSpec, out: Path, reward_window: int) -> dict:
    """Train, serve and evaluate one cell-seed, then write its done.json (atomically, last)."""
    job.dir.mkdir(parents=True, exist_ok=True)
    check_job_file(job)
    start = time.monotonic()
    train(job)
    trained = time.monotonic()
    report = evaluate(spec_eval, job, out)
    done = results(job, report, reward_window)
    done["seconds"] = {"train": round(trained - start, 1), "eval": round(time.monotonic() - trained, 1)}
    atomic_write_text(job.done_file, json.dumps(done, indent=2) + "\n")
    return done
