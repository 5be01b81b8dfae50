"""The matrix file: a start (commands that prepare it, the train config and its overrides), the held-out
eval, the seeds, a time budget, and the cells, each a name plus dotted overrides of the train config.

    prepare:                     # optional: observe-r1 command lines run once, in order, before any cell
      model: [tiny-model, "{out}/base/model", --size, tiny, --seed, "0", --force]
    train:
      config: "{configs}/tiny_cpu.yaml"       # a relative path is relative to the matrix file's folder
      overrides: ["model.path={out}/base/model", "data.paths=[{out}/base/data/data.jsonl]"]
    eval:
      data: "{out}/base/heldout/data.jsonl"   # --local-data of the local tasks
      tasks: [observe_r1_local_open, observe_r1_local_choice]
      limit: 32
      max_new_tokens: 64
    seeds: [0, 1, 2]
    time_budget_s: 300                        # training seconds per cell-seed (the trainer's max_time_s)
    baseline: "{out}/base/sft/model"          # optional: the start model, evaluated once the same way;
                                              # each cell's gain over it gets a paired bootstrap interval
    cells:
      - {name: ladder, overrides: [data.shuffle=false]}
      - {name: shuffled, overrides: [data.shuffle=true]}

`{out}` in any command, override or path stands for the `--out` folder, `{configs}` for the train
stage's packaged configs (train/configs). The file loads like a config (observe_r1.config): a `base:`
file it extends, unknown keys refused with a suggestion. `load_matrix` then checks every cell's
overrides against the train config, so a typo stops the command before anything trains, with the
file, the cell and the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from observe_r1.config import ConfigError, load_config
from observe_r1_train.config import load_training_config, validate_paths

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Overrides the runner sets itself for every cell-seed; a matrix may not set them.
RUNNER_KEYS = ("seed", "max_time_s", "checkpoint.output_dir", "checkpoint.resume")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class MatrixError(ConfigError):
    """A bad matrix file: the message names the file, the cell and the key."""


@dataclass
class TrainSpec:
    config: Path  # the train config; relative to the matrix file's folder
    overrides: list[str] = field(default_factory=list)  # every cell's: the start model, the data, the steps
    nproc: int = 1  # ranks per run (observe-r1 train --nproc)


@dataclass
class EvalSpec:
    """The held-out eval of every cell-seed's export: `observe-r1 eval` against `observe-r1 serve`."""

    data: Path | None = None  # rows in the sample schema for the local tasks (--local-data)
    suite: str | None = None  # a suite of eval/suites.yaml; or
    tasks: list[str] = field(default_factory=list)  # lmms-eval task names
    limit: int | None = None  # the first N samples of each task
    max_new_tokens: int | None = None  # None: the tasks' own length
    serve_args: list[str] = field(default_factory=list)  # more `observe-r1 serve` flags (engine, limits)
    ready_timeout_s: float = 600.0  # how long the server may take to load the model


@dataclass
class CellSpec:
    name: str  # its folder under cells/
    overrides: list[str] = field(default_factory=list)  # dotted train-config overrides


@dataclass
class MatrixSpec:
    train: TrainSpec
    eval: EvalSpec
    cells: list[CellSpec]
    seeds: list[int] = field(default_factory=lambda: [0])
    time_budget_s: float | None = None  # training seconds per cell-seed; None: no budget
    prepare: dict[str, list[str]] = field(default_factory=dict)  # name -> observe-r1 argv
    reward_window: int = 5  # the reward at the end: mean reward/total of the last N logged steps
    # The model every cell starts from (a folder, `{out}` filled in), evaluated once like a cell-seed:
    # the report gives each cell's held-out gain over it, question by question (report.py)
    baseline: str | None = None

    def __post_init__(self):
        """Checks of the matrix alone (the overrides are checked against the train config later)."""
        if not self.cells:
            raise ConfigError("cells: needs at least one cell")
        names = [c.name for c in self.cells]
        for i, name in enumerate(names):
            if not _NAME.fullmatch(name):
                raise ConfigError(f"cells[{i}].name: {name!r} is not a folder name (letters, digits, . _ -)")
            if names.index(name) != i:
                raise ConfigError(f"cells[{i}].name: {name!r} names two cells")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: needs one or more distinct seeds, got {self.seeds}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(f"time_budget_s: must be > 0, got {self.time_budget_s}")
        if self.reward_window < 1:
            raise ConfigError(f"reward_window: must be >= 1, got {self.reward_window}")
        if self.train.nproc < 1:
            raise ConfigError(f"train.nproc: must be >= 1, got {self.train.nproc}")
        if (self.eval.suite is None) == (not self.eval.tasks):
            raise ConfigError("eval: give either suite or tasks")
        for name, argv in self.prepare.items():
            if not argv:
                raise ConfigError(f"prepare.{name}: an empty command line")


def fill(text: str, out: Path) -> str:
    """`text` with `{out}` replaced by the output folder and `{configs}` by the train stage's packaged
    configs (train/configs); nothing else is a placeholder."""
    return text.replace("{out}", str(out)).replace("{configs}", str(CONFIGS))


def cell_overrides(spec: MatrixSpec, cell: CellSpec, out: Path) -> list[str]:
    """The matrix's and the cell's train overrides, in that order, with `{out}` filled in."""
    return [fill(o, out) for o in (*spec.train.overrides, *cell.overrides)]


def _key(override: str) -> str:
    return override.partition("=")[0].strip()


def check_cells(spec: MatrixSpec, path: Path, out: Path) -> None:
    """Build the train config of every cell (each override checked: key, type, range, cross-field
    rules); the first problem is raised as a MatrixError naming the file, the cell and the key."""
    for where, overrides in [("train.overrides", spec.train.overrides)] + [
        (f"cells[{i}] ({c.name})", c.overrides) for i, c in enumerate(spec.cells)
    ]:
        for override in overrides:
            if _key(override) in RUNNER_KEYS:
                raise MatrixError(
                    f"{path}: {where}: {_key(override)}: set by observe-r1 ablate for every cell-seed"
                    f" ({', '.join(RUNNER_KEYS)}); leave it out"
                )
    for i, cell in enumerate(spec.cells):
        try:
            load_training_config(spec.train.config, cell_overrides(spec, cell, out))
        except ConfigError as e:
            raise MatrixError(f"{path}: cell '{cell.name}' (cells[{i}]): {e}") from None


def check_inputs(spec: MatrixSpec, path: Path, out: Path) -> None:
    """After the prepare steps: every cell's data and model exist (the train config's own check), and
    the held-out rows; so a wrong path stops the matrix before its first cell trains, not at its cell."""
    for i, cell in enumerate(spec.cells):
        try:
            validate_paths(load_training_config(spec.train.config, cell_overrides(spec, cell, out)))
        except ConfigError as e:
            raise MatrixError(f"{path}: cell '{cell.name}' (cells[{i}]): {e}") from None
    data = spec.eval.data and Path(fill(str(spec.eval.data), out))
    if data and not data.is_file():
        raise MatrixError(f"{path}: eval.data: no such file: {data}")
    baseline = spec.baseline and Path(fill(spec.baseline, out))
    if baseline and not (baseline / "config.json").is_file():
        raise MatrixError(f"{path}: baseline: not a model folder (no config.json): {baseline}")


def check_prepare(spec: MatrixSpec, path: Path, out: Path) -> None:
    """Each prepare step must be an observe-r1 command line its subcommand parses."""
    from observe_r1.cli import build_parser

    parser = build_parser()
    for name, argv in spec.prepare.items():
        line = [fill(a, out) for a in argv]
        try:
            args, rest = parser.parse_known_args(line)
        except SystemExit:  # argparse has printed what is wrong
            raise MatrixError(f"{path}: prepare.{name}: not an observe-r1 command line: {line}") from None
        if rest and not getattr(args, "passthrough", False):
            raise MatrixError(f"{path}: prepare.{name}: unrecognized arguments: {' '.join(rest)}")


def load_matrix(path: Path, out: Path) -> MatrixSpec:
    """Read and check the matrix file at `path` for the output folder `out`; nothing runs."""
    spec = load_config(MatrixSpec, path)
    config = Path(fill(str(spec.train.config), out))
    spec.train.config = config if config.is_absolute() else Path(path).parent / config
    if not spec.train.config.is_file():
        raise MatrixError(f"{path}: train.config: no such file: {spec.train.config}")
    check_prepare(spec, Path(path), out)
    check_cells(spec, Path(path), out)
    return spec
