"""Per-step metrics to a JSONL file and TensorBoard, sample rollouts to JSONL, curves to a PNG.

Only rank 0 writes. On resume from step S, rows of later steps (written before a crash, then
redone) are dropped from the JSONL files and TensorBoard purges its events after S, so every
step appears once in what a user looks at.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from observe_r1.io import atomic_write_text

METRICS_FILE = "metrics.jsonl"
ROLLOUTS_FILE = "rollouts.jsonl"
CURVES_FILE = "curves.png"

# (panel title, metric keys); a key missing from the log is skipped, an empty panel is left out
PANELS = [
    ("reward", ["reward/total", "reward/accuracy", "reward/format", "reward/bonus"]),
    ("rates", ["accuracy", "format_rate", "bonus_rate", "weight/zero_share", "token_accuracy"]),
    ("loss", ["loss"]),
    ("response length (tokens)", ["response_length/mean"]),
    ("policy", ["entropy", "kl", "clip_ratio"]),
    ("optimizer", ["grad_norm"]),
    ("learning rate", ["lr"]),
]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_after(path: Path, step: int) -> None:
    """Keep only the rows of `path` whose "step" is at most `step` (atomic rewrite)."""
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    if Path(path).is_file():
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


class Tracker:
    """Appends one JSON row per logged step and mirrors the numbers to TensorBoard."""

    def __init__(
        self, output_dir: Path, *, enabled: bool, jsonl: bool, tensorboard: bool, start_step: int = 0
    ):
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.jsonl = jsonl and enabled
        self.writer = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS_FILE, ROLLOUTS_FILE):
            truncate_after(self.output_dir / name, start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=start_step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.jsonl:
            self._append(METRICS_FILE, {"step": step, **metrics})
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def log_rollouts(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Per prompt: sample id, rewards of its group and one response, for reading what the model says."""
        if self.jsonl:
            for row in rows:
                self._append(ROLLOUTS_FILE, {"step": step, **row})

    def _append(self, name: str, row: dict[str, Any]) -> None:
        with open(self.output_dir / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(metrics_file: Path, out_png: Path, title: str = "") -> Path | None:
    """A PNG with one panel per group of `PANELS`, x = step; None when there is nothing to plot."""
    rows = read_jsonl(metrics_file)
    panels = [(name, [k for k in keys if any(k in r for r in rows)]) for name, keys in PANELS]
    panels = [(name, keys) for name, keys in panels if keys]
    if not rows or not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.4 * nrows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*points, strict=True), marker="." if len(points) < 50 else None, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
