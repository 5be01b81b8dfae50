"""The `observe-r1` command: one subcommand per stage, each a thin shell over a library function."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


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
        args.dir, n=args.n, seed=args.seed, image_size=args.image_size, overwrite=args.force
    )
    print(f"wrote {args.n} samples to {path} in {time.perf_counter() - start:.1f}s")


def _chat(args: argparse.Namespace) -> None:
    from observe_r1.chat import build_messages, generate, open_images
    from observe_r1.data import load_samples
    from observe_r1.format import parse
    from observe_r1.modeling import load_model, load_processor

    gold = None
    if args.sample:
        samples = load_samples(args.sample)
        if not 0 <= args.row < len(samples):
            raise ValueError(f"--row {args.row} is out of range: {args.sample} has {len(samples)} rows")
        sample = samples[args.row]
        question, image_paths, gold = sample.question, sample.images, sample.answer
    else:
        question, image_paths = args.question, args.image
    model = load_model(args.model)
    processor = load_processor(args.model)
    start = time.perf_counter()
    out = generate(
        model,
        processor,
        build_messages(question, len(image_paths)),
        open_images(image_paths),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    seconds = time.perf_counter() - start
    result = parse(out.text, nested_observe=args.nested_observe)
    report = {
        "question": question,
        "gold_answer": gold,
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


def _serve(args: argparse.Namespace) -> None:
    from observe_r1_serve.cli import run

    code = run(args)
    if code:
        sys.exit(code)


def _ask(args: argparse.Namespace) -> None:
    from observe_r1_serve.client import run

    run(args)


def _train(args: argparse.Namespace) -> None:
    from observe_r1_train.cli import run

    code = run(args, stage=args.stage)
    if code:
        sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="observe-r1", description=__doc__)
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
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--nested-observe", action="store_true", help="also accept <observe> nested in <think>")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_chat)

    from observe_r1_serve.cli import add_server_arguments

    p = sub.add_parser("serve", help="OpenAI-compatible chat-completions server with parsed fields")
    add_server_arguments(p)
    p.set_defaults(func=_serve)

    from observe_r1_serve.client import add_arguments as add_ask_arguments

    p = sub.add_parser("ask", help="ask a running server one question with images (openai client)")
    add_ask_arguments(p)
    p.set_defaults(func=_ask)

    from observe_r1_train.cli import add_arguments as add_train_arguments

    p = sub.add_parser("train", help="Observe-R1 GRPO on DeepSpeed from a YAML config (train/configs/)")
    add_train_arguments(p)
    p.set_defaults(func=_train, stage="grpo")
    p = sub.add_parser("sft", help="supervised warm start on formatted answers (same engine as train)")
    add_train_arguments(p)
    p.set_defaults(func=_train, stage="sft")
    sub.add_parser("eval", add_help=False, help="lmms-eval suites and the chain-length report (eval/run.py)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from observe_r1.data import DataError
    from observe_r1.modeling import ModelLoadError

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "eval":  # every argument, --help included, belongs to eval/run.py
        from observe_r1_eval.run import main as eval_main

        return eval_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        args.func(args)
    except (DataError, ModelLoadError, FileExistsError, FileNotFoundError, ValueError, TimeoutError) as e:
        print(f"observe-r1 {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
