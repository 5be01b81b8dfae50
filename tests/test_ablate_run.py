"""`observe-r1 ablate` for real on the tiny model: a 2-cell matrix, 1 seed, 1 GRPO step each, each export
served by `observe-r1 serve` and evaluated by `observe-r1 eval` (lmms-eval in .venv-eval) on a 4-row
held-out set that the matrix's prepare step makes; then a rerun that trains nothing, and a bad override
refused before anything runs. About 2-3 minutes on this 2-core machine (most of it the two lmms-eval
starts)."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import CLI

REPO = Path(__file__).resolve().parent.parent
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


@pytest.mark.skipif(
    not (REPO / ".venv-eval" / "bin" / "python").exists(), reason="lmms-eval's environment: make setup-eval"
)
def test_two_cells_train_serve_eval_report_and_resume(tiny_model_dir, synth_dir, tmp_path):
    cells = {"ladder": ["data.shuffle=false"], "shuffled": ["data.shuffle=true"]}
    path, out = matrix(tmp_path, tiny_model_dir, synth_dir, cells), tmp_path / "out"
    first = ablate(path, out)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "[1/2] cell 'ladder' seed 0: train (data.shuffle=false), serve, eval" in first.stderr
    assert "[2/2] cell 'shuffled' seed 0: train (data.shuffle=true), serve, eval" in first.stderr
    assert "ETA " in first.stderr.split("[2/2]")[1]

    results = json.loads((out / "results.json").read_text())
    assert [c["name"] for c in results["cells"]] == ["ladder", "shuffled"]
    for cell in results["cells"]:
        assert cell["seeds"] == [0] and cell["missing_seeds"] == [] and cell["steps"] == [1]
        assert set(cell["metrics"]) == {
            "accuracy",
            "format_rate",
            "observation_tokens",
            "reasoning_tokens",
            "answer_tokens",
            "reward_end",
        }
        accuracy = cell["metrics"]["accuracy"]
        assert accuracy["n"] == 1 and 0 <= accuracy["mean"] <= 1 and accuracy["low"] is None  # one seed
        assert cell["metrics"]["answer_tokens"]["mean"] > 0  # the random model says something
        assert [p["step"] for p in cell["reward_curve"]] == [1]
        done = json.loads((out / "cells" / cell["name"] / "seed-0" / "done.json").read_text())
        assert 0 < done["benchmarks"]["observe_r1_local_open"]["samples"] <= 4  # its open-answer rows
    table = (out / "results.md").read_text()
    assert "| `ladder` | 1 | 1-1 |" in table and "| `shuffled` | 1 | 1-1 |" in table
    assert table in first.stdout
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    logs = sorted((out / "cells").glob("*/seed-0/*.log")) + sorted((out / "cells").glob("*/seed-0/done.json"))
    stamps = {p: p.stat().st_mtime_ns for p in logs}
    second = ablate(path, out)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "[1/2] cell 'ladder' seed 0: already done, skipping" in second.stderr
    assert "[2/2] cell 'shuffled' seed 0: already done, skipping" in second.stderr
    assert "prepare heldout: already done, skipping" in second.stderr
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
