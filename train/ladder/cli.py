"""`observe-r1 ladder`: build the NeuraLadder curriculum or the difficulty-prior stages from a reference
model's samples.

    observe-r1 ladder --model M --data ROWS --out DIR [--samples 8] [--preset neuraladder] [KEY=VALUE ...]
    observe-r1 ladder --server URL --server-model NAME --data ROWS --out DIR ...

The flags are shorthands for config keys (train/ladder/config.py); layers, lowest first: the preset's
defaults, `--config FILE`, the flags, then dotted `KEY=VALUE` overrides. Running the same command
again continues an interrupted run from its cache, or rebuilds the ladder from the cache when only the
steps after sampling changed.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from observe_r1.command import Command
from observe_r1.errors import InvalidValue


def _map(text: str) -> dict[str, str]:
    """`question=problem,answer=solution` -> {"question": "problem", "answer": "solution"}."""
    pairs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        field, sep, column = part.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise InvalidValue(f"--map: expected FIELD=COLUMN pairs separated by commas, got '{part}'")
        pairs[field.strip()] = column.strip()
    return pairs


def overrides(args: argparse.Namespace) -> list[str]:
    """The flags as dotted overrides (values as JSON, which YAML reads back exactly), then the user's own."""
    flags = {
        "out": args.out,
        "preset": args.preset,
        "reference.model": args.model,
        "reference.server": args.server,
        "reference.server_model": args.server_model,
        "input.paths": None if args.data is None else [str(p) for p in args.data],
        "input.map": None if args.map is None else _map(args.map),
        "contamination.eval_sets": None if args.eval_set is None else [str(p) for p in args.eval_set],
        "sampling.samples": args.samples,
    }
    given = [
        f"{key}={json.dumps(str(v) if isinstance(v, Path) else v)}"
        for key, v in flags.items()
        if v is not None
    ]
    return given + list(args.overrides)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="a local reference model folder, sampled in-process (reference.model)"
    )
    parser.add_argument("--server", help="an OpenAI-compatible base URL instead, e.g. http://host:8000/v1")
    parser.add_argument("--server-model", help="the served model's name on --server")
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        help="rows: JSONL, Parquet or a datasets folder (repeatable; input.paths)",
    )
    parser.add_argument("--out", type=Path, help="the output folder (holds the cache too)")
    parser.add_argument(
        "--samples", type=int, help="K reasoning samples per question (sampling.samples, default 8)"
    )
    parser.add_argument("--preset", help="neuraladder (default) or difficulty-prior")
    parser.add_argument("--config", type=Path, help="a YAML file of ladder options")
    parser.add_argument(
        "--map", help="schema field = source column pairs, e.g. question=problem,images=image"
    )
    parser.add_argument(
        "--eval-set", type=Path, action="append", help="a rows file to check for contamination (repeatable)"
    )
    parser.add_argument("--force", action="store_true", help="discard the folder's cached samples first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted options, e.g. smoothing.width=1"
    )


def run(args: argparse.Namespace) -> int:
    from observe_r1_train.ladder.build import build
    from observe_r1_train.ladder.config import load_ladder_config

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    cfg = load_ladder_config(args.config, overrides(args))
    summary, timing = build(cfg, force=args.force, progress=not args.no_progress)
    for step in summary["steps"]:
        state = f"dropped {step['dropped']} of {step['in']}" if step["enabled"] else "off"
        print(f"{step['step']:>14}: {state}")
    for name, t in timing.items():
        done = f"{t['questions'] - t['sampled']} from the cache"
        if t["sampled"]:
            rate = t["sampled"] / t["seconds"]
            done += f", {t['sampled']} sampled in {t['seconds']:.1f}s ({rate:.2f} questions/s)"
        print(f"{name:>14}: {t['questions']} questions: {done}")
    levels = summary["levels"]["ladder"]
    print(f"{'ladder':>14}: {summary['rows']} rows, per level {levels}")
    print(f"{'written':>14}: {', '.join(str(cfg.out / f) for f in summary['files'])}")
    return 0


LADDER = Command(
    help="build the NeuraLadder curriculum or the difficulty-prior stages from a reference model's samples",
    add_arguments=add_arguments,
    run=run,
)
