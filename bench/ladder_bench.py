"""The ladder's batched generation against one `generate` call per sample, same engine, same run.

    .venv/bin/python bench/ladder_bench.py [--out DIR] [--questions 8] [--samples 8] [--batch-questions 4]

Builds the `small` model (31M parameters) and `--questions` synthetic problems with images of
`--image-size` pixels, then samples `--samples` responses of at most `--new-tokens` tokens to each
question twice through the same `TransformersRollout` on the same loaded model:

- ladder: the ladder's local sampler (`LocalSampler.generate`, what `observe-r1 ladder --model` runs):
  `--batch-questions` questions per `generate` call, each prompt prefilled and its image encoded once,
  its K samples decoded together, every sample appended to the cache;
- one per sample: a `generate` call of n=1 for every single sample.

Both sample at temperature 1 from random weights, which rarely stop early, so the two generate about
the same tokens (reported). The first `--warmup` questions of each mode are sampled once before
timing. Writes results.json and results.md to the output folder, atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from observe_r1.io import atomic_write_text  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "ladder")
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--samples", type=int, default=8, help="K samples per question")
    p.add_argument("--batch-questions", type=int, default=4, help="questions per ladder generate call")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--warmup", type=int, default=1, help="questions sampled once per mode before timing")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    """The small model and the synthetic questions (built once, reused by later runs)."""
    from observe_r1 import synth, tiny_model

    model = args.out / "model"
    if not (model / "config.json").is_file():
        tiny_model.build(model, size="small", seed=0, overwrite=True)
    data = args.out / f"data-{args.image_size}px-{args.questions}"
    if not (data / "data.jsonl").is_file():
        synth.generate(
            data, n=args.questions, seed=0, image_size=args.image_size, overwrite=True, progress=False
        )
    return model, data / "data.jsonl"


def main(argv=None) -> int:
    args = parse_args(argv)
    from observe_r1.data import load_samples
    from observe_r1.format import SYSTEM_PROMPT
    from observe_r1.sampling import SamplingParams
    from observe_r1_train.ladder.cache import SampleCache
    from observe_r1_train.ladder.config import EngineConfig
    from observe_r1_train.ladder.samplers import LocalSampler, Question

    model_dir, data = prepare(args)
    samples = load_samples(data)
    questions = [Question(f"q{i}", s, s.id) for i, s in enumerate(samples)]
    params = SamplingParams(temperature=1.0, max_tokens=args.new_tokens, n=args.samples, seed=0)
    engine = EngineConfig(batch_questions=args.batch_questions, device=args.device)
    sampler = LocalSampler(str(model_dir), engine, args.batch_questions * args.samples)
    rollout = sampler.rollout
    results: dict = {"settings": vars(args) | {"out": str(args.out)}, "device": sampler.device}

    with tempfile.TemporaryDirectory() as tmp:
        warm = SampleCache(Path(tmp), "warm", {})
        sampler.generate(questions[: args.warmup], replace(params, n=1), SYSTEM_PROMPT, warm, lambda _: None)
        cache = SampleCache(Path(tmp), "bench", {})
        started = time.perf_counter()
        sampler.generate(questions, params, SYSTEM_PROMPT, cache, lambda _: None)
        seconds = time.perf_counter() - started
        tokens = sum(r.tokens for q in questions for r in cache.get(q.key, args.samples))
    results["ladder"] = {"seconds": seconds, "responses": len(questions) * args.samples, "tokens": tokens}

    for s in samples[: args.warmup]:
        rollout.generate([s], [s.question], replace(params, n=1), SYSTEM_PROMPT)
    started, tokens = time.perf_counter(), 0
    for i, s in enumerate(samples):
        for j in range(args.samples):
            batch = rollout.generate(
                [s], [s.question], replace(params, n=1, seed=i * 1000 + j), SYSTEM_PROMPT
            )
            tokens += int(batch.completion_lengths.sum())
    seconds = time.perf_counter() - started
    results["one_per_sample"] = {
        "seconds": seconds,
        "responses": len(samples) * args.samples,
        "tokens": tokens,
    }

    for mode in ("ladder", "one_per_sample"):
        r = results[mode]
        r["responses_per_s"] = r["responses"] / r["seconds"]
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
    speedup = results["ladder"]["responses_per_s"] / results["one_per_sample"]["responses_per_s"]
    results["speedup"] = speedup
    lines = [
        f"# Ladder generation, small model, {args.questions} questions x K={args.samples}, "
        f"{args.new_tokens} new tokens, {args.image_size}px images, {sampler.device}",
        "",
        "| mode | responses/s | tokens/s | seconds | mean tokens |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for mode, name in (
        ("ladder", f"ladder ({args.batch_questions} questions/call)"),
        ("one_per_sample", "one generate per sample"),
    ):
        r = results[mode]
        lines.append(
            f"| {name} | {r['responses_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['seconds']:.1f} |"
            f" {r['tokens'] / r['responses']:.1f} |"
        )
    lines += ["", f"speed-up: {speedup:.2f}x (target 3x)"]
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.out / "results.md", text)
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
