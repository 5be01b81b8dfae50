"""The `observe-r1` command: one subcommand per job, each a thin shell over a library function.

The core's own subcommands (tiny-model, synth-data, chat) are defined here; the stages add theirs
(serve, ask, train, sft, eval, ...) through the `observe_r1.commands` entry-point group
(`observe_r1.command`), so the core imports no stage. A `UserError` prints its message and exits 2;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

from observe_r1.command import ENTRY_POINT_GROUP, Command
from observe_r1.errors import InvalidValue, UserError
from observe_r1.format import DEFAULT_VARIANT, VARIANTS, parse, system_prompt, variant_spec


def _tiny_model(args: argparse.Namespace) -> None:
    from observe_r1 import tiny_model
    from observe_r1.modeling import load_model

    start = time.perf_counter()
    out = tiny_model.build(args.dir, size=args.size, seed=args.seed, overwrite=args.force)
    seconds = time.perf_counter() - start
    params = tiny_model.parameter_count(load_model(out))
    size_mb = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(
        f"wrote {args.size} Qwen2.5-VL model to {out}: {params:,} parameters, {size_mb:.1f} MB, {seconds:.1f}s"
    )


def _synth_data(args: argparse.Namespace) -> None:
    from observe_r1 import synth

    start = time.perf_counter()
    path = synth.generate(
        args.dir,
        n=args.n,
        seed=args.seed,
        image_size=args.image_size,
        overwrite=args.force,
        families=args.families,
        levels=args.levels,
    )
    print(f"wrote {args.n} samples to {path} in {time.perf_counter() - start:.1f}s")


def _chat(args: argparse.Namespace) -> None:
    from observe_r1.chat import build_messages, generate, open_images
    from observe_r1.data import load_samples
    from observe_r1.modeling import load_model, load_processor
    from observe_r1.sampling import NEUTRAL, SamplingParams, checkpoint_defaults, describe, resolve

    variant = args.format_variant
    variant_spec(variant, args.nested_observe, ("--nested-observe", "--format-variant"))
    gold = None
    if args.sample:
        samples = load_samples(args.sample)
        if not 0 <= args.row < len(samples):
            raise InvalidValue(f"--row {args.row} is out of range: {args.sample} has {len(samples)} rows")
        sample = samples[args.row]
        question, image_paths, gold = sample.question, sample.images, sample.answer
    else:
        question, image_paths = args.question, args.image
    defaults = checkpoint_defaults(args.model) if args.generation_config == "auto" else {}
    values, sources = resolve({key: getattr(args, key) for key in NEUTRAL}, defaults)
    params = SamplingParams(**values, max_tokens=args.max_new_tokens, seed=args.seed)
    model = load_model(args.model)
    processor = load_processor(args.model)
    start = time.perf_counter()
    messages = build_messages(question, len(image_paths), system_prompt(variant))
    out = generate(model, processor, messages, open_images(image_paths), params)
    seconds = time.perf_counter() - start
    result = parse(out.text, args.nested_observe, variant)
    report = {
        "question": question,
        "gold_answer": gold,
        "sampling": describe(values, sources),
        "raw": out.text,
        "observation": result.observation,
        "reasoning": result.reasoning,
        "answer": result.answer,
        "format_ok": result.format_ok,
        "format_errors": list(result.errors),
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "seconds": round(seconds, 3),
    }
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return
    for key, value in report.items():
        print(f"{key:>18}: {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="observe-r1",
        description="Train, serve and evaluate multimodal reasoning models in the Observe-R1 style.",
    )
    # The deepspeed launcher puts `--local_rank=N` before the subcommand (`deepspeed --module
    # observe_r1.cli train ...`); the rank is read from LOCAL_RANK, which it sets too.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-model", help="build a small Qwen2.5-VL-architecture model offline")
    p.add_argument("dir", type=Path)
    p.add_argument("--size", choices=("tiny", "small"), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.set_defaults(func=_tiny_model)

    p = sub.add_parser("synth-data", help="generate synthetic visual problems with exact answers")
    p.add_argument("dir", type=Path)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument(
        "--families",
        default="reasoning",
        help="a preset (reasoning: counting, digits, bars, clocks, comparing counts; perception: colour, side,"
        " larger; all) or comma-separated family names",
    )
    p.add_argument("--levels", default="1,2,3,4,5", help="the levels drawn, comma-separated (1 easiest)")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.set_defaults(func=_synth_data)

    p = sub.add_parser(
        "chat", help="one chat turn with an image; prints the parsed fields and format verdict"
    )
    p.add_argument("--model", type=Path, required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--sample", type=Path, help="a data file; the question and images come from --row")
    source.add_argument("--question")
    p.add_argument("--row", type=int, default=0)
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable), with --question")
    p.add_argument("--max-new-tokens", type=int, default=64)
    unset = "default: the checkpoint's generation config, else %s"
    p.add_argument("--temperature", type=float, help=unset % "1.0 (0: greedy)")
    p.add_argument("--top-p", type=float, help=unset % "1.0")
    p.add_argument("--top-k", type=int, help=unset % "0 (no cut)")
    p.add_argument("--repetition-penalty", type=float, help=unset % "1.0 (none)")
    p.add_argument(
        "--generation-config",
        choices=("auto", "none"),
        default="auto",
        help="auto: unset sampling options from the model's generation_config.json; none: ignore that file",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--nested-observe", action="store_true", help="also accept <observe> nested in <think>")
    p.add_argument(
        "--format-variant",
        choices=VARIANTS,
        default=DEFAULT_VARIANT,
        help="the model's output format, which picks the system prompt and the check: observe"
        " (<observe><think><answer>, default) or think (<think><answer>)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_chat)

    for name, command in stage_commands().items():
        p = sub.add_parser(name, help=command.help, add_help=not command.passthrough)
        if command.add_arguments is not None:
            command.add_arguments(p)
        p.set_defaults(func=command.run, passthrough=command.passthrough)
    return parser


def stage_commands() -> dict[str, Command]:
    """The subcommands the installed stages declare, by name, in their declared order."""
    commands = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        command = entry.load()
        if not isinstance(command, Command):
            raise TypeError(
                f"entry point {entry.name} = {entry.value} is a {type(command).__name__}, not a Command"
            )
        commands.setdefault(entry.name, command)
    return commands


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):  # every argument, --help included, belongs to the command
        return args.func(rest) or 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"observe-r1 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
