"""`observe-r1 ablate MATRIX --out DIR`: check the matrix, prepare the start, run every unfinished
cell-seed (train, serve, eval), and write the results after each one.

Progress goes to stderr, one line when a cell-seed starts (what runs, the time so far, an ETA from the
cell-seeds finished in this sitting) and one when it ends (its results). A finished cell-seed (its
done.json) is skipped, so a matrix can span several sittings; an unfinished one resumes from its own
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path

from observe_r1.command import Command
from observe_r1.errors import UserError
from observe_r1.io import atomic_write_text
from observe_r1_train.ablate import report
from observe_r1_train.ablate.cell import CommandFailed, check_job_file, run_baseline, run_job, run_logged
from observe_r1_train.ablate.plan import Job, baseline_job, plan, select
from observe_r1_train.ablate.spec import MatrixSpec, check_inputs, fill, load_matrix


def log(message: str) -> None:
    print(f"[ablate] {message}", file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """`1h02m03s`, `4m05s` or `12s`."""
    s = round(seconds)
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m{s % 60:02d}s" if h else f"{m}m{s % 60:02d}s" if m else f"{s}s"


def prepare(spec: MatrixSpec, out: Path) -> None:
    """Run the matrix's prepare commands in order, each once: DIR/prepare/NAME.done.json records it."""
    for name, argv in spec.prepare.items():
        line = [fill(a, out) for a in argv]
        marker = out / "prepare" / f"{name}.done.json"
        if marker.is_file():
            if json.loads(marker.read_text())["argv"] != line:
                raise UserError(
                    f"prepare.{name}: {out} was prepared with another command line; delete {marker} to redo it"
                )
            log(f"prepare {name}: already done, skipping")
            continue
        log(f"prepare {name}: observe-r1 {' '.join(line)}")
        status = run_logged(line, out / "prepare" / f"{name}.log")
        if status != 0:
            raise CommandFailed(
                f"prepare.{name} failed (exit {status}); see {out / 'prepare' / f'{name}.log'}"
            )
        atomic_write_text(marker, json.dumps({"argv": line}, indent=2) + "\n")


def evaluate_baseline(spec: MatrixSpec, out: Path) -> dict | None:
    """The start model's eval (the matrix's `baseline`), once per output folder; None without one."""
    job = baseline_job(spec, out)
    if job is None:
        return None
    result = job.done()
    if result is not None and result["model"] == str(job.model_dir):
        log(f"baseline {job.model_dir}: already evaluated, skipping")
        return result
    if result is not None:  # another model's eval: its report would be read as this one's
        shutil.rmtree(job.dir)
    log(f"baseline {job.model_dir}: serve, eval")
    began = time.monotonic()
    result = run_baseline(job, spec.eval, out)
    m = result["metrics"]
    log(
        f"baseline: done in {duration(time.monotonic() - began)}: accuracy {m['accuracy']:.3f},"
        f" format {m['format_rate']:.3f}"
    )
    return result


def run_all(
    spec: MatrixSpec, matrix: Path, out: Path, seeds: list[int] | None = None, cells: list[str] | None = None
) -> list[dict]:
    """The baseline, then every unfinished cell-seed in plan order (of `seeds` and `cells` only, when
    given), the results of every finished one rewritten after each; returns the summaries."""
    every = plan(spec, out)
    jobs = select(every, seeds, cells)
    baseline = evaluate_baseline(spec, out)
    overrides = {c.name: c.overrides for c in spec.cells}
    done: dict[str, list[dict]] = {}
    todo: list[Job] = []
    for job in every:
        result = job.done()
        if result is None:
            if job in jobs:
                todo.append(job)
        else:
            check_job_file(job)  # a finished cell-seed of other overrides would be reported as this one
            done.setdefault(job.cell, []).append(result)
    start, spent = time.monotonic(), []
    for i, job in enumerate(jobs, 1):
        head = f"[{i}/{len(jobs)}] {job.label}"
        if job not in todo:
            log(f"{head}: already done, skipping")
            continue
        left = len(todo) - len(spent)
        eta = f"ETA {duration(left * sum(spent) / len(spent))}" if spent else "ETA after the first cell-seed"
        told = " ".join(overrides[job.cell]) or "no overrides"
        log(f"{head}: train ({told}), serve, eval; elapsed {duration(time.monotonic() - start)}, {eta}")
        began = time.monotonic()
        result = run_job(job, spec.eval, out, spec.reward_window)
        spent.append(time.monotonic() - began)
        done.setdefault(job.cell, []).append(result)
        m = result["metrics"]
        log(
            f"{head}: done in {duration(spent[-1])}, {result['steps']} steps: accuracy {m['accuracy']:.3f},"
            f" format {m['format_rate']:.3f}, reward at the end {m['reward_end']:.3f}"
        )
        report.write(spec, matrix, out, done, baseline)
    return report.write(spec, matrix, out, done, baseline)


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    out = args.out.resolve()
    spec = load_matrix(args.matrix, out)
    log(f"{args.matrix}: {len(spec.cells)} cells x {len(spec.seeds)} seeds; results in {out}")
    previous = signal.signal(signal.SIGTERM, _stop)  # a stop reaches the training run as SIGTERM
    try:
        select(plan(spec, out), args.seeds, args.cells)  # an unknown seed or cell stops it before preparing
        prepare(spec, out)
        check_inputs(spec, args.matrix, out)
        run_all(spec, args.matrix, out, args.seeds, args.cells)
    except KeyboardInterrupt:
        log("stopped; run the same command again to resume")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print((out / "results.md").read_text())
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "matrix", type=Path, help="the matrix file, e.g. train/configs/ablations/cpu/ladder_order.yaml"
    )
    parser.add_argument("--out", type=Path, required=True, help="the results folder (a later run resumes it)")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="run these of the matrix's seeds only (the report covers every finished one)",
    )
    parser.add_argument(
        "--cells", nargs="+", help="run these cells only (the report covers every finished one)"
    )


ABLATE = Command(
    help="an ablation matrix: every cell x seed trained, served and evaluated; results with intervals",
    add_arguments=add_arguments,
    run=run,
)
