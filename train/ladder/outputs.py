"""What the ladder writes, every file atomically (observe_r1.io): the rows as JSONL and Parquet (and
one JSONL per stage), what was dropped and why, the summary JSON, and the PNG.

Rows are in the sample schema (observe_r1.data), so `observe-r1 train` reads them as they are; image
paths are made relative to the output folder, as the schema reads them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from observe_r1.data import is_url
from observe_r1.io import atomic_path, atomic_write_text

LADDER_JSONL = "ladder.jsonl"
LADDER_PARQUET = "ladder.parquet"
STAGE_FILES = {1: "stage1.jsonl", 2: "stage2.jsonl"}
DROPPED = "dropped.jsonl"
SUMMARY = "summary.json"
PLOT = "ladder.png"
LADDER_FILES = (LADDER_JSONL, LADDER_PARQUET, *STAGE_FILES.values(), PLOT)


def relative_images(images: list[str], out: Path) -> list[str]:
    """Local image paths relative to `out` (URLs as they are)."""
    return [ref if is_url(ref) else os.path.relpath(ref, out) for ref in images]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows as a Parquet table whose columns are every key of any row (missing cells null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows])
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


def remove_stale(out: Path, keep: set[str]) -> None:
    """Remove ladder files of an earlier run that this run did not write (a now-empty ladder, stages off)."""
    for name in LADDER_FILES:
        if name not in keep:
            (out / name).unlink(missing_ok=True)


def plot(path: Path, summary: dict[str, Any], complexities: dict[int, list[float]]) -> None:
    """A 2 x 2 figure: the difficulty histogram before and after the filters, complexity per level in
    the ladder, the smoothing mix (which levels fill each level's stretch), and what each step dropped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = summary["samples_per_question"]
    scored, kept = summary["levels"]["sampled"], summary["levels"]["ladder"]
    x = list(range(k + 1))
    labels = [f"{i / k:.2f}".rstrip("0").rstrip(".") if i else "0" for i in x]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    ax.bar([i - 0.2 for i in x], scored, width=0.4, label="sampled")
    ax.bar([i + 0.2 for i in x], kept, width=0.4, label="ladder")
    ax.set(title="difficulty (1 - correct / K)", xticks=x, xticklabels=labels, ylabel="questions")
    ax.legend()

    ax = axes[0][1]
    levels = [lv for lv in x if complexities.get(lv)]
    if levels:
        ax.boxplot([complexities[lv] for lv in levels], positions=levels)
    ax.set(
        title="complexity per level (mean generated tokens)",
        xticks=x,
        xticklabels=labels,
        xlim=(-0.5, k + 0.5),
    )

    ax = axes[1][0]
    mix = summary["smoothing"]["mix"]
    segments = sorted(int(s) for s in mix)
    bottoms = [0.0] * len(segments)
    colours = plt.get_cmap("viridis", k + 1)
    for source in x:
        shares = [mix[str(s)].get(str(source), 0) / max(1, sum(mix[str(s)].values())) for s in segments]
        if any(shares):
            ax.bar(segments, shares, bottom=bottoms, color=colours(source), label=f"from {labels[source]}")
            bottoms = [b + v for b, v in zip(bottoms, shares, strict=True)]
    title = (
        "smoothing: each level's stretch by source level"
        if summary["smoothing"]["enabled"]
        else "smoothing off"
    )
    ax.set(title=title, xticks=x, xticklabels=labels, ylabel="share", xlim=(-0.5, k + 0.5))
    if segments:
        ax.legend(fontsize=7)

    ax = axes[1][1]
    steps = [s for s in summary["steps"] if s["enabled"]]
    ax.barh([s["step"] for s in steps], [s["dropped"] for s in steps])
    ax.invert_yaxis()
    ax.set(title=f"dropped per step ({summary['rows_read']} rows read, {summary['rows']} in the ladder)")
    ax.set_xlabel("rows")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        # No software version in the file: the same ladder gives the same bytes.
        fig.savefig(tmp, dpi=90, format="png", metadata={"Software": None})
    plt.close(fig)
