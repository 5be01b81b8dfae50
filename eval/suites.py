"""The suite file (suites.yaml) as data: which lmms-eval tasks a suite runs and how each is scored."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from observe_r1.errors import InvalidValue

SUITES_FILE = Path(__file__).with_name("suites.yaml")
TASKS_DIR = Path(__file__).with_name("tasks")
LOCAL_SUITE = "local"


@dataclass(frozen=True)
class Benchmark:
    """One row of the report: `task` is the lmms-eval task, `metric` the accuracy in its results."""

    benchmark: str
    task: str
    metric: str | None = None  # None: the task's first metric (a task named with --tasks, not in the file)
    judge: str | None = None  # "required", "optional" or None

    @property
    def is_local(self) -> bool:
        """A task of the local suite: it reads the --local-data file, and lmms-eval need not vouch for it."""
        return self.task in {b.task for b in load_suites()[LOCAL_SUITE]}


def _load() -> dict:
    return yaml.safe_load(SUITES_FILE.read_text())


def load_suites() -> dict[str, list[Benchmark]]:
    """Suite name -> its benchmarks, in the file's order (the report's row order)."""
    return {name: [Benchmark(**entry) for entry in entries] for name, entries in _load()["suites"].items()}


def reasoning_tags() -> list[list[str]]:
    """The [start, end] tag pairs lmms-eval cuts out before scoring (its --reasoning_tags)."""
    return _load()["reasoning_tags"]


def judge_env() -> dict:
    """Judge setting -> the environment variables of lmms-eval's tasks that carry it."""
    return _load()["judge_env"]


def select(suite: str | None, tasks: list[str] | None) -> list[Benchmark]:
    """The benchmarks to run: a suite (`all`: every suite), or the named tasks (known or not to the file).

    Raises ValueError naming an unknown suite; unknown task names are checked against lmms-eval itself.
    """
    suites = load_suites()
    if tasks:
        known = {b.task: b for entries in suites.values() for b in entries}
        return [known.get(t, Benchmark(benchmark=t, task=t)) for t in dict.fromkeys(tasks)]
    if suite == "all":
        return [b for entries in suites.values() for b in entries]
    if suite not in suites:
        raise InvalidValue(f"unknown suite '{suite}': expected one of {', '.join([*suites, 'all'])}")
    return suites[suite]
