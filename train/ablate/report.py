"""results.json, results.md and curves.png of a matrix, from its finished cell-seeds (done.json).

Per cell: each metric of done.json as the mean over its finished seeds with a 95% Student-t interval
(stats.py), the steps trained, and the mean reward curve; with a baseline (the start model), the gain
in held-out accuracy over it: per question, the cell's score averaged over its seeds minus the start
model's, with a 95% paired bootstrap interval over the questions. Written atomically, after every
finished cell-seed, so the files describe what is finished so far.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from observe_r1.io import atomic_path, atomic_write_text
from observe_r1_train.ablate.spec import MatrixSpec
from observe_r1_train.ablate.stats import Interval, mean_curve, paired_bootstrap, t_interval, trailing_mean

CONFIDENCE = 0.95
# done.json's metrics in table order: (key, column, scale for the table, digits)
COLUMNS = [
    ("accuracy", "held-out accuracy %", 100, 1),
    ("format_rate", "format %", 100, 1),
    ("observation_tokens", "observation tokens", 1, 1),
    ("reasoning_tokens", "reasoning tokens", 1, 1),
    ("answer_tokens", "answer tokens", 1, 1),
    ("reward_end", "reward at the end", 1, 3),
]
CI_NOTE = (
    f"mean over seeds [{100 * CONFIDENCE:.0f}% Student-t interval: mean ± t(n-1) · s / √n]; "
    "n/a: fewer than two seeds finished. Lengths: mean tokens per response on the held-out set; "
    "reward at the end: mean reward/total of the last logged steps."
)


GAIN_NOTE = (
    "gain over the start: held-out accuracy points over the baseline model; per question the cell's mean"
    f" over its seeds minus the baseline's, averaged [{100 * CONFIDENCE:.0f}% paired bootstrap interval"
    " over the questions]."
)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def paired_gain(runs: list[dict], baseline: dict) -> Interval:
    """The cell's accuracy gain over the baseline, question by question: d_q = mean over the cell's
    seeds of its score on q minus the baseline's, over the questions every run and the baseline hold."""
    shared = set(baseline["questions"]).intersection(*(r["questions"] for r in runs)) if runs else set()
    diffs = [
        sum(r["questions"][q] for r in runs) / len(runs) - baseline["questions"][q] for q in sorted(shared)
    ]
    return paired_bootstrap(diffs, CONFIDENCE)


def summarise(spec: MatrixSpec, done: dict[str, list[dict]], baseline: dict | None = None) -> list[dict]:
    """One entry per cell of the matrix: its overrides, finished seeds, steps, metric intervals, curve,
    and with a baseline its paired gain."""
    cells = []
    for cell in spec.cells:
        runs = sorted(done.get(cell.name, []), key=lambda r: r["seed"])
        metrics = {
            key: asdict(t_interval([r["metrics"][key] for r in runs], CONFIDENCE)) for key, *_ in COLUMNS
        }
        curve = mean_curve([r["reward_curve"] for r in runs])
        cells.append(
            {
                "name": cell.name,
                "overrides": cell.overrides,
                "seeds": [r["seed"] for r in runs],
                "missing_seeds": [s for s in spec.seeds if s not in {r["seed"] for r in runs}],
                "steps": [r["steps"] for r in runs],
                "metrics": metrics,
                "per_seed": {str(r["seed"]): {k: _finite(v) for k, v in r["metrics"].items()} for r in runs},
                "reward_curve": [{"step": s, "mean": m, "seeds": n} for s, m, n in curve],
                **({"gain": asdict(paired_gain(runs, baseline))} if baseline else {}),
            }
        )
    return cells


def _cell_text(interval: dict, scale: float, digits: int) -> str:
    iv = Interval(**interval)
    if iv.mean is None:
        return "–"
    text = f"{scale * iv.mean:.{digits}f}"
    if iv.low is None:
        return f"{text} [n/a]"
    return f"{text} [{scale * iv.low:.{digits}f}, {scale * iv.high:.{digits}f}]"


def markdown(title: str, cells: list[dict], baseline: dict | None = None) -> str:
    """The table of results.md: the baseline's row (if any), one row per cell, then each cell's overrides."""
    head = ["cell", "seeds", "steps", *(column for _, column, *_ in COLUMNS)]
    if baseline:
        head.insert(3, "gain over the start, points")
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    if baseline:
        values = baseline["metrics"]
        row = ["start (baseline)", "–", "0", "–"]
        row += [
            f"{scale * values[key]:.{digits}f}" if key in values else "–" for key, _, scale, digits in COLUMNS
        ]
        lines.append("| " + " | ".join(row) + " |")
    for c in cells:
        steps = "–" if not c["steps"] else f"{min(c['steps'])}-{max(c['steps'])}"
        row = [f"`{c['name']}`", str(len(c["seeds"])), steps]
        if baseline:
            row.append(_cell_text(c["gain"], 100, 1))
        row += [_cell_text(c["metrics"][key], scale, digits) for key, _, scale, digits in COLUMNS]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        CI_NOTE,
        *(["", GAIN_NOTE] if baseline else []),
        "",
        "| cell | overrides |",
        "| --- | --- |",
    ]
    lines += [f"| `{c['name']}` | {' '.join(f'`{o}`' for o in c['overrides']) or '(none)'} |" for c in cells]
    return "\n".join(lines) + "\n"


def plot(title: str, cells: list[dict], path: Path, window: int = 1) -> None:
    """curves.png: the mean reward/total over seeds against the step, one colour per cell: faint as
    logged, bold as the trailing mean of `window` steps (one rollout of a few prompts is noisy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for c in cells:
        if c["reward_curve"]:
            steps = [p["step"] for p in c["reward_curve"]]
            means = [p["mean"] for p in c["reward_curve"]]
            label = f"{c['name']} (n={len(c['seeds'])})"
            if window > 1 and len(steps) > window:
                (raw,) = ax.plot(steps, means, alpha=0.25, linewidth=0.8)
                ax.plot(
                    steps, trailing_mean(means, window), color=raw.get_color(), linewidth=1.8, label=label
                )
            else:
                ax.plot(steps, means, marker="." if len(steps) < 50 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("reward/total, mean over seeds")
    ax.set_title(title + (f"\nfaint: as logged; bold: trailing mean of {window} steps" if window > 1 else ""))
    ax.grid(alpha=0.3)
    if any(c["reward_curve"] for c in cells):
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def write(
    spec: MatrixSpec, matrix: Path, out: Path, done: dict[str, list[dict]], baseline: dict | None = None
) -> list[dict]:
    """results.json, results.md and curves.png in `out`; returns the cells' summaries."""
    cells = summarise(spec, done, baseline)
    title = f"ablation {matrix.stem}"
    body = {
        "matrix": str(matrix),
        "interval": f"{100 * CONFIDENCE:.0f}% Student t over seeds: mean ± t(n-1) · s / √n",
        "seeds": spec.seeds,
        "cells": cells,
    }
    if baseline:
        body["baseline"] = {"model": baseline["model"], "metrics": baseline["metrics"], "gain": GAIN_NOTE}
    atomic_write_text(out / "results.json", json.dumps(body, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "results.md", markdown(title, cells, baseline))
    plot(title, cells, out / "curves.png", spec.reward_window)
    return cells
