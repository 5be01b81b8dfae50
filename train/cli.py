"""`observe-r1 train` and `observe-r1 sft`: a YAML config plus dotted overrides, on one or more ranks.

The config is parsed and every input path checked before any model loads, so a typo costs a
second, not a model load. `--nproc N` relaunches the same command under torchrun with N ranks on
this machine; under torchrun or the deepspeed launcher (RANK set) it runs as the given rank.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from observe_r1.command import Command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, required=True, help="a YAML file, e.g. train/configs/tiny_cpu.yaml"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=1e-5"
    )
    parser.add_argument(
        "--resume",
        help="auto (latest checkpoint in the output folder, the default), none, or a checkpoint folder",
    )
    parser.add_argument(
        "--nproc", type=int, default=1, help="ranks on this machine (relaunches under torchrun)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    parser.add_argument("--log-level", default="info")


def _relaunch(args: argparse.Namespace) -> int:
    """The same command under torchrun with `--nproc` ranks; returns torchrun's exit status.

    `--nproc` itself is left out: torchrun would take it for its own `--nproc-per-node`, and the
    ranks know their number from the environment it sets."""
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            argv.append(arg)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        "-m",
        "observe_r1.cli",
        *argv,
    ]
    return subprocess.run(command, check=False).returncode


def _setup_logging(level: str) -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=level.upper(), format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"
    )
    if level.lower() != "debug":
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def _load(args: argparse.Namespace, loader):
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    return loader(args.config, overrides)


def run(args: argparse.Namespace, stage: str = "grpo") -> int:
    """Run GRPO (`stage="grpo"`) or the SFT warm start (`"sft"`); returns the exit status."""
    from observe_r1_train.config import load_training_config, validate_paths
    from observe_r1_train.sft import load_sft_config

    cfg = _load(args, load_training_config if stage == "grpo" else load_sft_config)
    validate_paths(cfg)
    if args.nproc > 1 and "RANK" not in os.environ:
        return _relaunch(args)
    _setup_logging(args.log_level)
    if stage == "grpo":
        from observe_r1_train.trainer import GRPOTrainer

        summary = GRPOTrainer(cfg, progress=not args.no_progress).train()
    else:
        from observe_r1_train.sft import SFTTrainer

        summary = SFTTrainer(cfg, progress=not args.no_progress).train()
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2))
    return 0


TRAIN = Command(
    help="Observe-R1 GRPO on DeepSpeed from a YAML config (train/configs/)",
    add_arguments=add_arguments,
    run=functools.partial(run, stage="grpo"),
)
SFT = Command(
    help="supervised warm start on formatted answers (same engine as train)",
    add_arguments=add_arguments,
    run=functools.partial(run, stage="sft"),
)
