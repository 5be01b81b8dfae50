"""The pure parts of `observe-r1 ablate`: the Student-t interval, mean curves, the matrix checks, the
plan, the results tables, and the shipped matrices (every cell's overrides load against the train config)."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml

from observe_r1.cli import build_parser
from observe_r1.config import ConfigError
from observe_r1_eval.run import run_parser
from observe_r1_train.ablate import report
from observe_r1_train.ablate.cell import check_job_file, eval_argv, results, serve_argv
from observe_r1_train.ablate.plan import plan, select
from observe_r1_train.ablate.spec import MatrixError, check_inputs, load_matrix
from observe_r1_train.ablate.stats import (
    mean_curve,
    paired_bootstrap,
    t_interval,
    t_quantile,
    t_two_sided_cdf,
    trailing_mean,
)

REPO = Path(__file__).resolve().parent.parent
MATRICES = sorted((REPO / "train" / "configs" / "ablations").glob("*/[!_]*.yaml")) + sorted(
    (REPO / "train" / "configs" / "experiments").glob("*.yaml")
)


@pytest.mark.parametrize(
    ("df", "expected"),  # two-sided 95% critical values from printed tables
    [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (9, 2.262), (10, 2.228), (30, 2.042)],
)
def test_t_quantile_matches_the_tables(df, expected):
    assert t_quantile(0.95, df) == pytest.approx(expected, abs=1e-3)
    assert t_two_sided_cdf(t_quantile(0.95, df), df) == pytest.approx(0.95, abs=1e-9)


def test_t_quantile_nears_the_normal_for_many_degrees_of_freedom():
    assert t_quantile(0.95, 1000) == pytest.approx(1.962, abs=1e-3)
    assert t_quantile(0.99, 3) == pytest.approx(5.841, abs=1e-3)


def test_t_interval_formula():
    values = [0.2, 0.4, 0.9]
    iv = t_interval(values)
    mean = sum(values) / 3
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    half = 4.302653 * s / math.sqrt(3)
    assert iv.n == 3 and iv.mean == pytest.approx(mean)
    assert iv.low == pytest.approx(mean - half, abs=1e-5) and iv.high == pytest.approx(mean + half, abs=1e-5)


def test_t_interval_edge_cases():
    assert t_interval([0.5]) == t_interval([0.5, float("nan")])  # a missing value is left out
    one = t_interval([0.5])
    assert (one.n, one.mean, one.low, one.high) == (1, 0.5, None, None)
    assert t_interval([]).mean is None
    same = t_interval([0.3, 0.3, 0.3])
    assert same.low == pytest.approx(0.3) and same.high == pytest.approx(0.3)


def test_paired_bootstrap_interval():
    assert paired_bootstrap([1.0] * 50) == paired_bootstrap([1.0] * 50, seed=7)  # no spread: [1, 1]
    assert paired_bootstrap([1.0] * 50).low == 1.0 == paired_bootstrap([1.0] * 50).high
    # 300 questions, 1 in 3 gained and none lost: mean 1/3, standard error sqrt(2/9 / 300) = 0.027
    gained = paired_bootstrap([1.0, 0.0, 0.0] * 100)
    assert gained.n == 300 and gained.mean == pytest.approx(1 / 3)
    assert gained.low == pytest.approx(1 / 3 - 1.96 * 0.0272, abs=0.012)
    assert gained.high == pytest.approx(1 / 3 + 1.96 * 0.0272, abs=0.012)
    even = paired_bootstrap([1.0, -1.0, 0.0] * 100)  # as many lost as gained: the interval holds 0
    assert even.low < 0 < even.high
    assert paired_bootstrap([]).mean is None and paired_bootstrap([0.5]).low is None


def test_trailing_mean_smooths_over_the_window_and_starts_with_what_there_is():
    assert trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert trailing_mean([1.0, 3.0, 5.0, 7.0], 3) == [1.0, 2.0, 3.0, 5.0]
    assert trailing_mean([2.0, 4.0], 1) == [2.0, 4.0] and trailing_mean([], 5) == []


def test_mean_curve_averages_the_seeds_that_reach_each_step():
    assert mean_curve([[(1, 0.0), (2, 1.0)], [(1, 1.0)]]) == [(1, 0.5, 2), (2, 1.0, 1)]


def write_matrix(tmp_path: Path, **changes) -> Path:
    spec = {
        "train": {"config": str(REPO / "train" / "configs" / "tiny_cpu.yaml"), "overrides": ["max_steps=2"]},
        "eval": {"data": "{out}/heldout.jsonl", "suite": "local", "limit": 4},
        "seeds": [0, 1],
        "time_budget_s": 60,
        "cells": [{"name": "a", "overrides": ["data.shuffle=true"]}, {"name": "b"}],
        **changes,
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"cells": [{"name": "a", "overides": []}]},
            "cells[0].overides: unknown key (did you mean 'overrides'?)",
        ),
        (
            {"cells": [{"name": "a"}, {"name": "b", "overrides": ["algorithm.weight_sigma=high"]}]},
            "cell 'b' (cells[1]): override 'algorithm.weight_sigma=high': algorithm.weight_sigma: expected float",
        ),
        (
            {"cells": [{"name": "a", "overrides": ["rollout.group_size=1"]}]},
            "cell 'a' (cells[0]): ",
        ),
        ({"cells": [{"name": "a", "overrides": ["seed=3"]}]}, "cells[0] (a): seed: set by observe-r1 ablate"),
        (
            {"train": {"config": "nowhere.yaml"}},
            "train.config: no such file",
        ),
        ({"cells": [{"name": "a"}, {"name": "a"}]}, "cells[1].name: 'a' names two cells"),
        ({"cells": [{"name": "a/b"}]}, "cells[0].name: 'a/b' is not a folder name"),
        ({"cells": []}, "cells: needs at least one cell"),
        ({"seeds": [1, 1]}, "seeds: needs one or more distinct seeds"),
        ({"time_budget_s": 0}, "time_budget_s: must be > 0"),
        ({"eval": {"suite": "local", "tasks": ["x"]}}, "eval: give either suite or tasks"),
        ({"prepare": {"x": ["no-such-command"]}}, "prepare.x: not an observe-r1 command line"),
        (
            {"prepare": {"x": ["tiny-model", "d", "--sise", "tiny"]}},
            "prepare.x: unrecognized arguments: --sise",
        ),
    ],
)
def test_bad_matrices_are_refused_naming_file_cell_and_key(tmp_path, changes, message):
    path = write_matrix(tmp_path, **changes)
    with pytest.raises(ConfigError) as e:
        load_matrix(path, tmp_path / "out")
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)


def test_missing_inputs_are_found_before_the_first_cell_trains(tmp_path, tiny_model_dir, synth_dir):
    rows = synth_dir / "data.jsonl"
    train = {
        "config": str(REPO / "train" / "configs" / "tiny_cpu.yaml"),
        "overrides": [f"model.path={tiny_model_dir}", f"data.paths=[{rows}]"],
    }
    cells = [{"name": "a"}, {"name": "b", "overrides": ["data.paths=[{out}/nowhere.jsonl]"]}]
    path, out = write_matrix(tmp_path, train=train, cells=cells), tmp_path / "out"
    spec = load_matrix(path, out)  # the paths are not checked yet: a prepare step may make them
    with pytest.raises(MatrixError, match=r"cell 'b' \(cells\[1\]\): data.paths\[0\]: no such file"):
        check_inputs(spec, path, out)
    spec.cells = spec.cells[:1]
    with pytest.raises(MatrixError, match="eval.data: no such file"):
        check_inputs(spec, path, out)


def test_plan_runs_every_cell_with_a_seed_before_the_next_seed(tmp_path):
    out = tmp_path / "out"
    spec = load_matrix(write_matrix(tmp_path), out)
    jobs = plan(spec, out)
    assert [(j.cell, j.seed) for j in jobs] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    argv = jobs[2].train_argv
    assert argv[:2] == ("train", "--config") and "--nproc" not in argv
    assert argv[4:] == (
        "max_steps=2",
        "data.shuffle=true",
        "seed=1",
        f"checkpoint.output_dir={out / 'cells' / 'a' / 'seed-1' / 'train'}",
        "max_time_s=60.0",
    )


def test_a_sitting_can_run_some_seeds_and_cells_and_unknown_ones_are_refused(tmp_path):
    out = tmp_path / "out"
    jobs = plan(load_matrix(write_matrix(tmp_path), out), out)
    assert select(jobs) == jobs
    assert [(j.cell, j.seed) for j in select(jobs, seeds=[1])] == [("a", 1), ("b", 1)]
    assert [(j.cell, j.seed) for j in select(jobs, seeds=[0, 1], cells=["b"])] == [("b", 0), ("b", 1)]
    with pytest.raises(MatrixError, match=r"--seeds: \[7\] not in the matrix \(it has \[0, 1\]\)"):
        select(jobs, seeds=[7])
    with pytest.raises(MatrixError, match=r"--cells: \['c'\] not in the matrix \(it has \['a', 'b'\]\)"):
        select(jobs, cells=["a", "c"])


def test_a_cell_seed_started_with_other_overrides_is_refused(tmp_path):
    out = tmp_path / "out"
    job = plan(load_matrix(write_matrix(tmp_path), out), out)[0]
    job.dir.mkdir(parents=True)
    check_job_file(job)
    check_job_file(job)  # the same command line: fine
    changed = dataclasses.replace(job, train_argv=(*job.train_argv, "optim.lr=1"))
    with pytest.raises(Exception, match="was started with another command line"):
        check_job_file(changed)


def fake_done(cell: str, seed: int, accuracy: float, rewards: list[float]) -> dict:
    return {
        "cell": cell,
        "seed": seed,
        "steps": len(rewards),
        "metrics": {
            "accuracy": accuracy,
            "format_rate": 1.0,
            "observation_tokens": 10.0,
            "reasoning_tokens": 20.0,
            "answer_tokens": 2.0,
            "reward_end": rewards[-1],
        },
        "reward_curve": [[i + 1, r] for i, r in enumerate(rewards)],
    }


def test_results_files_hold_every_cell_with_intervals(tmp_path):
    out = tmp_path / "out"
    spec = load_matrix(write_matrix(tmp_path), out)
    done = {"a": [fake_done("a", 1, 0.5, [0.1, 0.3]), fake_done("a", 0, 0.3, [0.2, 0.4])]}
    cells = report.write(spec, tmp_path / "m.yaml", out, done)
    body = json.loads((out / "results.json").read_text())
    assert body["cells"] == cells and [c["name"] for c in cells] == ["a", "b"]
    a, b = cells
    assert a["seeds"] == [0, 1] and b["seeds"] == [] and b["missing_seeds"] == [0, 1]
    acc = a["metrics"]["accuracy"]
    assert acc["mean"] == pytest.approx(0.4) and acc["high"] - acc["mean"] == pytest.approx(
        12.7062 * 0.1, abs=1e-3
    )
    assert a["reward_curve"] == [
        {"step": 1, "mean": pytest.approx(0.15), "seeds": 2},
        {"step": 2, "mean": pytest.approx(0.35), "seeds": 2},
    ]
    table = (out / "results.md").read_text()
    assert "| `a` | 2 | 2-2 | 40.0 [-87.1, 167.1] | 100.0 [100.0, 100.0] |" in table
    assert "| `b` | 0 | – | – |" in table and "| `a` | `data.shuffle=true` |" in table
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def samples_file(path: Path, questions: list[str], scores: list[float]) -> str:
    """An lmms-eval samples log of `questions` (one image each) with their accuracy."""
    lines = [
        {"doc_id": i, "input": q, "input_media": [f"/img/{i}.png"], "accuracy": str(a), "doc_hash": "same"}
        for i, (q, a) in enumerate(zip(questions, scores, strict=True))
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_results_of_a_cell_seed_weigh_benchmarks_by_samples(tmp_path):
    out = tmp_path / "out"
    job = plan(load_matrix(write_matrix(tmp_path), out), out)[0]
    job.train_dir.mkdir(parents=True)
    rows = [{"step": s, "reward/total": r} for s, r in [(1, 0.0), (2, 1.0), (3, 0.5)]]
    (job.train_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokens = lambda n: {p: {"mean": n} for p in ("observation", "reasoning", "answer", "total")}  # noqa: E731
    t1 = samples_file(tmp_path / "t1.jsonl", ["q"], [1.0])
    t2 = samples_file(tmp_path / "t2.jsonl", ["q", "r", "s"], [0.0, 0.0, 0.0])
    report_json = {
        "benchmarks": [
            {"task": "t1", "samples": 1, "accuracy": 1.0, "format_rate": 0.0, "tokens": tokens(4)},
            {"task": "t2", "samples": 3, "accuracy": 0.0, "format_rate": 1.0, "tokens": tokens(8)},
        ]
    }
    for row, path in zip(report_json["benchmarks"], (t1, t2), strict=True):
        row.update(metric="accuracy", samples_file=path)
    done = results(job, report_json, reward_window=2)
    assert done["steps"] == 3 and done["reward_curve"] == [[1, 0.0], [2, 1.0], [3, 0.5]]
    # every question's score, under a key of its task, index and content (lmms-eval's doc_hash is one
    # value for all of a task's documents here, as in the real logs)
    assert len(done["questions"]) == 4 and sorted(done["questions"].values()) == [0.0, 0.0, 0.0, 1.0]
    assert len({k.split(":")[0] for k in done["questions"]}) == 4
    assert done["metrics"] == {
        "accuracy": 0.25,
        "format_rate": 0.75,
        "observation_tokens": 7.0,
        "reasoning_tokens": 7.0,
        "answer_tokens": 7.0,
        "reward_end": 0.75,
    }


def test_results_with_a_baseline_give_each_cell_its_paired_gain(tmp_path):
    out = tmp_path / "out"
    spec = load_matrix(write_matrix(tmp_path, baseline="{out}/start"), out)
    questions = [f"q{i}" for i in range(40)]
    start = {f"t/{q}": 0.0 for q in questions[:20]} | {f"t/{q}": 1.0 for q in questions[20:]}
    baseline = {"model": "start", "metrics": {"accuracy": 0.5, "format_rate": 1.0}, "questions": start}
    a0, a1 = fake_done("a", 0, 0.75, [0.1]), fake_done("a", 1, 0.5, [0.2])
    # seed 0 gains 10 questions (+25 points), seed 1 none: per question (s0 + s1) / 2 - start
    a0["questions"] = start | {f"t/{q}": 1.0 for q in questions[:10]}
    a1["questions"] = dict(start)
    cells = report.write(spec, tmp_path / "m.yaml", out, {"a": [a0, a1]}, baseline)
    gain = cells[0]["gain"]
    assert gain["n"] == 40 and gain["mean"] == pytest.approx(0.125) and 0 < gain["low"] < 0.125 < gain["high"]
    assert cells[1]["gain"]["mean"] is None  # no finished seed
    table = (out / "results.md").read_text()
    assert "| start (baseline) | – | 0 | – | 50.0 | 100.0 |" in table
    assert f"| `a` | 2 | 1-1 | 12.5 [{100 * gain['low']:.1f}, {100 * gain['high']:.1f}] | 62.5 [" in table
    assert "paired bootstrap" in table
    body = json.loads((out / "results.json").read_text())
    assert body["baseline"]["model"] == "start" and body["cells"][0]["gain"] == gain


def test_the_baseline_must_be_a_model_folder(tmp_path, tiny_model_dir, synth_dir):
    out = tmp_path / "out"
    path = write_matrix(
        tmp_path,
        baseline="{out}/nothing",
        train={
            "config": str(REPO / "train" / "configs" / "tiny_cpu.yaml"),
            "overrides": [f"model.path={tiny_model_dir}", f"data.paths=[{synth_dir / 'data.jsonl'}]"],
        },
        eval={"data": str(synth_dir / "data.jsonl"), "suite": "local"},
    )
    with pytest.raises(MatrixError, match=r"baseline: not a model folder \(no config.json\): .*nothing"):
        check_inputs(load_matrix(path, out), path, out)


@pytest.mark.parametrize("path", MATRICES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_matrices_load_with_every_cell(path, tmp_path):
    """Every shipped matrix checks out against the train config, and its command lines parse; the
    format ablation serves and evaluates each cell in its own format."""
    spec = load_matrix(path, tmp_path)
    assert len(spec.cells) >= 2 and len(spec.seeds) >= 2 and spec.time_budget_s
    parser, job = build_parser(), plan(spec, tmp_path)[0]
    parser.parse_args(list(job.train_argv))
    parser.parse_args(serve_argv(spec.eval, job, 8000))
    eval_args = eval_argv(spec.eval, job, "http://127.0.0.1:8000/v1", tmp_path)
    assert run_parser().parse_args(eval_args[1:]).model == "ablate"
    if path.stem == "format_variant":
        variants = [job.format_variant for job in plan(spec, tmp_path)[: len(spec.cells)]]
        assert variants == ["observe", "think"]
        think = plan(spec, tmp_path)[1]
        assert "think" == parser.parse_args(serve_argv(spec.eval, think, 8000)).format_variant
        assert (
            run_parser().parse_args(eval_argv(spec.eval, think, "http://x/v1", tmp_path)[1:]).format_variant
            == "think"
        )
