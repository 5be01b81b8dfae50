"""`observe-r1 ablate` for real on the tiny model: the lean evidence run (the shipped learning matrix,
one seed, 300 GRPO steps: prepare, the SFT start's eval, train, serve, eval on 100 held-out questions
through lmms-eval in .venv-eval), then a rerun that runs nothing, and a bad override refused before
anything runs. About 5 minutes on this 2-core machine."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import CLI

REPO = Path(__file__).resolve().parent.parent
LEARNING = REPO / "train" / "configs" / "experiments" / "learning_cpu.yaml"
SMALL_STEP = [
    "max_steps=1",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "rollout.max_new_tokens=16",
    "optim.train_batch=4",
    "optim.micro_batch=4",
    "checkpoint.save_every=0",
    "logging.tensorboard=false",
]


def matrix(tmp_path: Path, model: Path, data: Path, cells: dict[str, list[str]]) -> Path:
    """A matrix of `cells` (name -> overrides) on the tiny model, its held-out rows made by a prepare step."""
    spec = {
        "prepare": {"heldout": ["synth-data", "{out}/heldout", "--n", "4", "--seed", "1", "--force"]},
        "train": {
            "config": str(REPO / "train" / "configs" / "tiny_cpu.yaml"),
            "overrides": [f"model.path={model}", f"data.paths=[{data / 'data.jsonl'}]", *SMALL_STEP],
        },
        "eval": {
            "data": "{out}/heldout/data.jsonl",
            "tasks": ["observe_r1_local_open"],
            "limit": 4,
            "max_new_tokens": 16,
        },
        "seeds": [0],
        "time_budget_s": 300,
        "cells": [{"name": name, "overrides": overrides} for name, overrides in cells.items()],
    }
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def ablate(path: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "ablate", str(path), "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=REPO
    )


def lean_learning_matrix(tmp_path: Path) -> Path:
    """The shipped evidence matrix (train/configs/experiments/learning_cpu.yaml), made lean: 400 training
    rows, 100 held-out questions, one seed of its `grpo` cell, 300 GRPO steps (about 2.5 minutes)."""
    spec = yaml.safe_load(LEARNING.read_text())
    for step, n in (("data", 400), ("heldout", 100)):
        argv = spec["prepare"][step]
        argv[argv.index("--n") + 1] = str(n)
    kept = [
        o for o in spec["train"]["overrides"] if not o.startswith(("max_steps=", "checkpoint.save_every="))
    ]
    spec["train"]["overrides"] = [*kept, "max_steps=300", "checkpoint.save_every=0"]
    spec["seeds"], spec["cells"] = [0], [c for c in spec["cells"] if c["name"] == "grpo"]
    path = tmp_path / "learning.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # prepare steps run in file order
    return path


@pytest.mark.skipif(
    not (REPO / ".venv-eval" / "bin" / "python").exists(), reason="lmms-eval's environment: make setup-eval"
)
def test_grpo_raises_held_out_accuracy_over_the_sft_start_and_a_rerun_skips_everything(tmp_path):
    """The lean evidence run: the SFT start and the GRPO export both served and evaluated greedily on
    the same 100 held-out questions; GRPO must gain at least 5 points, with a paired bootstrap interval
    above zero (measured: 26% -> 39%, +13 [3, 23]). A run that learns nothing fails it."""
    path, out = lean_learning_matrix(tmp_path), tmp_path / "out"
    first = ablate(path, out)
    assert first.returncode == 0, first.stderr[-4000:]
    assert (
        "baseline " in first.stderr
        and "[1/1] cell 'grpo' seed 0: train (no overrides), serve, eval" in first.stderr
    )

    results = json.loads((out / "results.json").read_text())
    assert results["baseline"]["model"] == str(out / "base" / "sft" / "model")
    (cell,) = results["cells"]
    assert cell["seeds"] == [0] and cell["steps"] == [300]
    gain, start = cell["gain"], results["baseline"]["metrics"]
    assert gain["n"] == 100  # every held-out question, paired
    assert gain["mean"] >= 0.05 and gain["low"] > 0, (start, cell["metrics"]["accuracy"], gain)
    assert cell["metrics"]["accuracy"]["mean"] == pytest.approx(start["accuracy"] + gain["mean"])
    assert cell["metrics"]["format_rate"]["mean"] > 0.5
    table = (out / "results.md").read_text()
    assert "| start (baseline) | – | 0 | – |" in table and "| `grpo` | 1 | 300-300 |" in table
    assert table in first.stdout
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    logs = (
        sorted(out.glob("cells/*/seed-0/*.log"))
        + sorted(out.glob("*/done.json"))
        + sorted(out.glob("baseline/*.log"))
    )
    stamps = {p: p.stat().st_mtime_ns for p in logs}
    second = ablate(path, out)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "[1/1] cell 'grpo' seed 0: already done, skipping" in second.stderr
    assert "already evaluated, skipping" in second.stderr
    assert "prepare sft: already done, skipping" in second.stderr
    assert "train (" not in second.stderr
    assert {p: p.stat().st_mtime_ns for p in logs} == stamps  # no train, serve or eval ran again


def test_a_bad_override_is_refused_before_anything_runs(tiny_model_dir, synth_dir, tmp_path):
    cells = {"good": ["algorithm.weight_sigma=1.0"], "typo": ["algorithm.weight_sgma=1.0"]}
    path, out = matrix(tmp_path, tiny_model_dir, synth_dir, cells), tmp_path / "out"
    proc = ablate(path, out)
    assert proc.returncode == 2, proc.stderr
    assert f"{path}: cell 'typo' (cells[1])" in proc.stderr
    assert "algorithm.weight_sgma: unknown key (did you mean 'weight_sigma'?)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing prepared, nothing trained
