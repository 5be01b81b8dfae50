"""The cell-seeds of a matrix, their folders and command lines, and which of them are finished.

DIR/cells/CELL/seed-S/
    job.json     what this cell-seed runs (its train command line); a later sitting must match it
    train/       checkpoint.output_dir of `observe-r1 train` (metrics.jsonl, checkpoints, model/)
    train.log    its output
    serve.log    `observe-r1 serve` on train/model
    eval/        `observe-r1 eval --output` (report.json)
    eval.log     its output
    done.json    the results, written atomically last: the cell-seed is finished
DIR/baseline/    the start model's eval (the matrix's `baseline`): serve.log, eval/, eval.log, done.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from observe_r1.format import DEFAULT_VARIANT
from observe_r1_train.ablate.spec import CellSpec, MatrixError, MatrixSpec, cell_overrides, fill
from observe_r1_train.config import load_training_config

DONE = "done.json"
JOB = "job.json"


@dataclass(frozen=True)
class Job:
    """One cell trained with one seed."""

    cell: str
    seed: int
    dir: Path
    train_argv: tuple[str, ...]  # `observe-r1 ...`: the train command line
    format_variant: str = DEFAULT_VARIANT  # the cell's format.variant, which serve and eval must share
    model: Path | None = None  # a model evaluated as it is (the baseline); None: the cell-seed's export

    @property
    def label(self) -> str:
        return f"cell {self.cell!r} seed {self.seed}"

    @property
    def train_dir(self) -> Path:
        return self.dir / "train"

    @property
    def model_dir(self) -> Path:
        return self.model or self.train_dir / "model"

    @property
    def eval_dir(self) -> Path:
        return self.dir / "eval"

    @property
    def done_file(self) -> Path:
        return self.dir / DONE

    def done(self) -> dict | None:
        """The results of a finished cell-seed, or None."""
        return json.loads(self.done_file.read_text()) if self.done_file.is_file() else None


def train_argv(spec: MatrixSpec, cell: CellSpec, seed: int, out: Path, job_dir: Path) -> tuple[str, ...]:
    """`observe-r1 train` for one cell-seed: the matrix's and cell's overrides, then the runner's own
    (the seed, the output folder, the time budget), which the matrix may not set."""
    argv = ["train", "--config", str(spec.train.config), "--no-progress"]
    if spec.train.nproc > 1:
        argv += ["--nproc", str(spec.train.nproc)]
    argv += [*cell_overrides(spec, cell, out), f"seed={seed}", f"checkpoint.output_dir={job_dir / 'train'}"]
    if spec.time_budget_s is not None:
        argv.append(f"max_time_s={spec.time_budget_s}")
    return tuple(argv)


def baseline_job(spec: MatrixSpec, out: Path) -> Job | None:
    """The start model's eval, in the format of the matrix's train config (without any cell's overrides)."""
    if spec.baseline is None:
        return None
    variant = load_training_config(
        spec.train.config, [fill(o, out) for o in spec.train.overrides]
    ).format.variant
    return Job("baseline", 0, out / "baseline", (), variant, model=Path(fill(spec.baseline, out)))


def plan(spec: MatrixSpec, out: Path) -> list[Job]:
    """Every cell-seed in run order: every cell with the first seed, then every cell with the next, so
    that a matrix stopped part-way has compared all its cells on the same seeds."""
    variants = {
        cell.name: load_training_config(spec.train.config, cell_overrides(spec, cell, out)).format.variant
        for cell in spec.cells
    }
    jobs = []
    for seed in spec.seeds:
        for cell in spec.cells:
            job_dir = out / "cells" / cell.name / f"seed-{seed}"
            argv = train_argv(spec, cell, seed, out, job_dir)
            jobs.append(Job(cell.name, seed, job_dir, argv, variants[cell.name]))
    return jobs


def select(jobs: list[Job], seeds: list[int] | None = None, cells: list[str] | None = None) -> list[Job]:
    """The jobs of some seeds and some cells (None: all), for a sitting that runs part of a matrix;
    a seed or cell the matrix does not have is refused by name."""
    for flag, asked, known in [
        ("--seeds", seeds, {j.seed for j in jobs}),
        ("--cells", cells, {j.cell for j in jobs}),
    ]:
        unknown = [a for a in asked or [] if a not in known]
        if unknown:
            raise MatrixError(f"{flag}: {unknown} not in the matrix (it has {sorted(known)})")
    return [j for j in jobs if (seeds is None or j.seed in seeds) and (cells is None or j.cell in cells)]
