"""The report: format compliance and chain lengths from raw responses, and the tables and plot.

Statistics are pure functions of the responses and a token counter, so they are tested on fixed
responses with known answers. Lengths are in tokens of the served model's tokenizer, per part of
`observe_r1.format.parse` (the single definition of the format): a part a response lacks counts as 0
tokens, so a model that skips its observation shows it in the lengths as well as in the compliance rate.
Compliance is the check of the format variant the run is told (`--format-variant`): a `think` model's
observation is 0 tokens by design, and its compliance is that of `<think>…</think><answer>…</answer>`.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from observe_r1.format import DEFAULT_VARIANT, parse
from observe_r1.io import atomic_write_text

PARTS = ("observation", "reasoning", "answer", "total")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarise(values: Sequence[float]) -> dict[str, float]:
    """mean, median and p90 of a list of lengths (NaN for an empty list)."""
    if not values:
        return {"mean": math.nan, "median": math.nan, "p90": math.nan}
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "p90": percentile(values, 90),
    }


def chain_stats(
    responses: Sequence[str],
    count_tokens: Callable[[str], int],
    nested_observe: bool = False,
    variant: str = DEFAULT_VARIANT,
) -> dict:
    """Format-compliance rate (`variant`'s check) and token lengths of observation, reasoning, answer and
    the whole response."""
    lengths: dict[str, list[int]] = {part: [] for part in PARTS}
    compliant = 0
    for text in responses:
        result = parse(text, nested_observe, variant)
        compliant += result.format_ok
        for part in PARTS[:3]:
            lengths[part].append(count_tokens(getattr(result, part)) if getattr(result, part) else 0)
        lengths["total"].append(count_tokens(text) if text else 0)
    return {
        "samples": len(responses),
        "format_rate": compliant / len(responses) if responses else math.nan,
        "tokens": {part: summarise(values) for part, values in lengths.items()},
    }


def token_counter(tokenizer_path: str) -> Callable[[str], int]:
    """Token count of a text with the served model's tokenizer, without special tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def markdown(rows: list[dict], title: str) -> str:
    """One table: accuracy, compliance and per-part token lengths (median, with mean and p90) per benchmark."""
    lines = [
        f"## {title}",
        "",
        "| benchmark | task | n | accuracy | format | observation tokens | reasoning tokens | answer tokens | total tokens |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        cells = [r["benchmark"], f"`{r['task']}`", str(r["samples"]), f"{100 * r['accuracy']:.1f}"]
        cells.append(f"{100 * r['format_rate']:.1f}")
        for part in PARTS:
            t = r["tokens"][part]
            cells.append(f"{_fmt(t['median'])} ({_fmt(t['mean'])} / {_fmt(t['p90'])})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "accuracy and format in %; token lengths: median (mean / p90)."]
    return "\n".join(lines) + "\n"


def compare_markdown(runs: dict[str, list[dict]]) -> str:
    """Several runs side by side: accuracy, format compliance and median total tokens per benchmark."""
    names = list(runs)
    benchmarks = list(dict.fromkeys(r["benchmark"] for rows in runs.values() for r in rows))
    head = "| benchmark | " + " | ".join(f"{n}: acc / format / tokens" for n in names) + " |"
    lines = [head, "| --- |" + " ---: |" * len(names)]
    for bench in benchmarks:
        cells = []
        for name in names:
            row = next((r for r in runs[name] if r["benchmark"] == bench), None)
            if row is None:
                cells.append("–")
                continue
            acc, fmt = 100 * row["accuracy"], 100 * row["format_rate"]
            cells.append(f"{acc:.1f} / {fmt:.1f} / {_fmt(row['tokens']['total']['median'])}")
        lines.append(f"| {bench} | " + " | ".join(cells) + " |")
    lines += ["", "accuracy and format in %; tokens: median length of the whole response."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    """PNG: accuracy against mean chain length (total tokens), one labelled point per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for i, r in enumerate(rows):
        x, y = r["tokens"]["total"]["mean"], 100 * r["accuracy"]
        ax.scatter(x, y)
        offset = (4, 6) if i % 2 == 0 else (4, -12)  # neighbours' labels on alternate sides
        ax.annotate(r["benchmark"], (x, y), textcoords="offset points", xytext=offset, fontsize=8)
    longest = max((r["tokens"]["total"]["mean"] for r in rows), default=0)
    ax.set_xlim(0, 1.3 * longest if longest > 0 else 1)  # room for the labels right of the points
    ax.set_ylim(-3, 103)
    ax.set_xlabel("mean response length (tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def write(rows: list[dict], out_dir: Path, title: str) -> str:
    """report.json, report.md and report.png in `out_dir`, each written atomically; returns the markdown."""
    text = markdown(rows, title)
    atomic_write_text(
        out_dir / "report.json", json.dumps({"title": title, "benchmarks": rows}, indent=2) + "\n"
    )
    atomic_write_text(out_dir / "report.md", text)
    plot(rows, out_dir / "report.png", title)
    return text
