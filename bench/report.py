"""The results as a table of targets, a Markdown page and a throughput plot."""

from __future__ import annotations

import os
from pathlib import Path

from drivers import Setup
from workload import CONCURRENCY

IN_PROCESS_MODES = {"plain": "plain", "prefix_cache": "prefix cache"}


def _in_process_rows(inproc: dict):
    """(mode label, batch size, measurements) for every in-process run."""
    for mode, label in IN_PROCESS_MODES.items():
        for batch, row in inproc[mode].items():
            yield label, batch, row


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _level(setups: list[Setup], key: str, concurrency: int) -> dict | None:
    setup = next((s for s in setups if s.key == key), None)
    return next((lv for lv in setup.levels if lv["concurrency"] == concurrency), None) if setup else None


def targets(setups: list[Setup], inproc: dict) -> list[dict]:
    """The three goals with their measured values (None where a setup failed), then context: the peer,
    the in-process ratio that bounds what any batching server can gain over one-at-a-time here, and
    what the prefix cache gains in-process. Both servers use the prefix cache (the default), so the
    in-process rows compared with them are those with the cache."""
    top = max(CONCURRENCY)

    def value(key: str, concurrency: int, metric: str) -> float | None:
        level = _level(setups, key, concurrency)
        return level[metric] if level else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    batched = value("batched", top, "tokens_per_s")
    ceiling, single = inproc["prefix_cache"].get(top), inproc["prefix_cache"].get(1)
    plain = inproc["plain"].get(top)
    rows = [
        (
            f"throughput at c={top}: batched / one-at-a-time baseline",
            ">= 5.0",
            ratio(batched, value("baseline", top, "tokens_per_s")),
            lambda v: v >= 5.0,
        ),
        (
            f"throughput: batched at c={top} / in-process generate at batch {top} with the prefix cache",
            ">= 0.70",
            ratio(batched, ceiling and ceiling["tokens_per_s"]),
            lambda v: v >= 0.7,
        ),
        (
            "latency p50 at c=1: batched / baseline",
            "<= 1.05 (no worse, within noise)",
            ratio(value("batched", 1, "latency_p50_s"), value("baseline", 1, "latency_p50_s")),
            lambda v: v <= 1.05,
        ),
        (
            f"throughput at c={top}: batched / transformers serve",
            "(context)",
            ratio(batched, value("peer", top, "tokens_per_s")),
            None,
        ),
        (
            f"in-process generate with the prefix cache: batch {top} / batch 1 (what batching can gain here)",
            "(context)",
            ratio(ceiling and ceiling["tokens_per_s"], single and single["tokens_per_s"]),
            None,
        ),
        (
            f"in-process generate with the prefix cache: prefill share of a batch of {top}",
            "(context)",
            ratio(ceiling and ceiling["prefill_s"], ceiling and ceiling["batch_s"]),
            None,
        ),
        (
            f"in-process generate at batch {top}: with / without the prefix cache",
            "(context)",
            ratio(ceiling and ceiling["tokens_per_s"], plain and plain["tokens_per_s"]),
            None,
        ),
    ]
    return [
        {"name": name, "target": target, "value": v, "met": None if check is None or v is None else check(v)}
        for name, target, v, check in rows
    ]


def render_markdown(meta: dict, setups: list[Setup], inproc: dict, goals: list[dict]) -> str:
    lines = [
        "# Serving benchmark",
        "",
        f"Model `small` (Qwen2.5-VL architecture, random weights), one {meta['image_size']}x{meta['image_size']} "
        f"PNG per request, `max_tokens={meta['max_tokens']}`, temperature 1.0, streamed; {meta['cpus']} CPU cores, "
        f"load average {meta['load_avg_start']:.2f} at the start and {meta['load_avg_end']:.2f} at the end. "
        "Latency is end to end; TTFT is the first chunk carrying text; tokens/s counts the completion tokens "
        "each server reports. In-process rows: latency is one batch's `generate`, TTFT its prefill (one new token); "
        "'prefix cache' rows start from the cached system turn, as both servers do.",
        "",
        "| setup | concurrency | requests ok | tokens/s | req/s | latency p50 | latency p90 | TTFT p50 | mean batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for setup in setups:
        if setup.error:
            lines.append(f"| {setup.label} | - | failed: {setup.error} | | | | | | |")
        for lv in setup.levels:
            batch = "-" if lv["mean_running"] is None else f"{lv['mean_running']:.1f}"
            lines.append(
                f"| {setup.label} | {lv['concurrency']} | {lv['ok']}/{lv['requests']} | {lv['tokens_per_s']:.1f} | "
                f"{lv['requests_per_s']:.2f} | {seconds(lv['latency_p50_s'])} | {seconds(lv['latency_p90_s'])} | "
                f"{seconds(lv['ttft_p50_s'])} | {batch} |"
            )
    for mode, batch, row in _in_process_rows(inproc):
        lines.append(
            f"| in-process generate, {mode} | batch {batch} | - | {row['tokens_per_s']:.1f} | "
            f"{batch / row['batch_s']:.2f} | {seconds(row['batch_s'])} | | {seconds(row['prefill_s'])} | {batch} |"
        )
    lines += ["", "| ratio | target | value | met |", "|---|---|---:|---|"]
    for goal in goals:
        value = "-" if goal["value"] is None else f"{goal['value']:.2f}"
        met = {True: "yes", False: "NO", None: "-"}[goal["met"]]
        lines.append(f"| {goal['name']} | {goal['target']} | {value} | {met} |")
    lines += ["", "Mean batch: the server's `num_requests_running` gauge sampled every 0.25 s.", ""]
    return "\n".join(lines)


def plot(path: Path, setups: list[Setup], inproc: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for setup in setups:
        if setup.levels:
            xs = [lv["concurrency"] for lv in setup.levels]
            ax.plot(xs, [lv["tokens_per_s"] for lv in setup.levels], marker="o", label=setup.label)
    for mode, batch, row in _in_process_rows(inproc):
        ax.axhline(
            row["tokens_per_s"],
            linestyle="--" if mode == IN_PROCESS_MODES["prefix_cache"] else ":",
            color="gray" if batch == 1 else "black",
            linewidth=1,
            label=f"in-process generate, {mode}, batch {batch}",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(CONCURRENCY), [str(c) for c in CONCURRENCY])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("completion tokens / s")
    ax.set_title("Throughput vs concurrency (small model, CPU)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
