"""Training step throughput: `observe-r1 train` against TRL's GRPOTrainer, same model, data and settings.

    .venv/bin/python bench/train_bench.py [--out DIR] [--prompts 2] [--steps 4] [--skip-trl]

Builds the `small` model (31M parameters) and synthetic problems with images of `--image-size`
pixels, then runs `--steps` GRPO steps with each trainer in its own process: `--prompts` prompts
x `--group` completions of exactly `--new-tokens` tokens at most (random weights rarely stop
early; the mean lengths are reported), one optimizer update per step in micro-batches of
`--micro-batch`, fp32, no gradient checkpointing, no reference model (beta 0), token-mean loss,
the same accuracy and format rewards. The first `--warmup` steps are left out of the means.

Writes results.json, results.md and steps.png to the output folder, atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from observe_r1.io import atomic_write_text  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "train")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    """The small model and `prompts x steps` synthetic problems (built once, reused by later runs)."""
    from observe_r1 import synth, tiny_model

    model = args.out / "model"
    if not (model / "config.json").is_file():
        tiny_model.build(model, size="small", seed=0, overwrite=True)
    data = args.out / f"data-{args.image_size}px"
    n = args.prompts * args.steps
    if not (data / "data.jsonl").is_file() or len((data / "data.jsonl").read_text().splitlines()) != n:
        synth.generate(data, n=n, seed=0, image_size=args.image_size, overwrite=True, progress=False)
    return model, data / "data.jsonl"


def run_ours(args: argparse.Namespace, model: Path, data: Path) -> dict:
    out = args.out / "ours"
    overrides = [
        f"model.path={model}",
        f"data.paths=[{data}]",
        f"checkpoint.output_dir={out}",
        "checkpoint.resume=none",
        "checkpoint.save_every=0",
        "checkpoint.export_hf=false",
        "logging.tensorboard=false",
        "logging.plot_png=false",
        "model.gradient_checkpointing=false",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.group_size={args.group}",
        f"rollout.max_new_tokens={args.new_tokens}",
        f"optim.train_batch={args.prompts * args.group}",
        f"optim.micro_batch={args.micro_batch}",
        "optim.lr=1e-6",
        "optim.warmup_ratio=0",
        f"max_steps={args.steps}",
        "algorithm.agg=token-mean",
        "reward.components={accuracy: 1.0, format: 1.0}",
    ]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    command = [
        sys.executable,
        "-m",
        "observe_r1.cli",
        "train",
        "--config",
        str(ROOT / "train/configs/tiny_cpu.yaml"),
    ]
    subprocess.run([*command, "--no-progress", *overrides], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "step_seconds": [r["time/step_s"] for r in rows],
        "rollout_seconds": [r["time/rollout_s"] for r in rows],
        "update_seconds": [r["time/update_s"] for r in rows],
        "completion_length": statistics.mean(r["response_length/mean"] for r in rows),
    }


def trl_worker(args: argparse.Namespace) -> None:
    """Run TRL's GRPOTrainer here (a separate process) and print its per-step times as JSON."""
    from datasets import Dataset
    from PIL import Image
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from observe_r1.answer import accuracy as answer_accuracy
    from observe_r1.data import Sample, load_samples
    from observe_r1.format import SYSTEM_PROMPT
    from observe_r1.modeling import load_model, load_processor
    from observe_r1_train.rewards import format_reward

    model_dir, data = prepare(args)
    samples = load_samples(data)
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    dataset = Dataset.from_dict(
        {
            "prompt": [
                [
                    {"role": "system", "content": [text(SYSTEM_PROMPT)]},
                    {"role": "user", "content": [{"type": "image"}, text(s.question)]},
                ]
                for s in samples
            ],
            "image": [Image.open(s.images[0]).convert("RGB") for s in samples],
            "answer": [s.answer for s in samples],
            "choices": [s.choices for s in samples],
        }
    )

    def _samples(answer, choices):
        return [Sample("", [], "", a, c) for a, c in zip(answer, choices, strict=True)]

    def accuracy(completions, answer, choices, **_):
        return [
            answer_accuracy(c[0]["content"], s)
            for c, s in zip(completions, _samples(answer, choices), strict=True)
        ]

    def fmt(completions, answer, choices, **_):
        return [
            format_reward(c[0]["content"], s)
            for c, s in zip(completions, _samples(answer, choices), strict=True)
        ]

    class Timer(TrainerCallback):
        def __init__(self):
            self.marks, self.lengths = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    responses = args.prompts * args.group
    config = GRPOConfig(
        output_dir=str(args.out / "trl"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=responses // args.micro_batch,
        num_generations=args.group,
        max_completion_length=args.new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        beta=0.0,
        loss_type="bnpo",
        max_steps=args.steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=False,
        gradient_checkpointing=False,
        shuffle_dataset=False,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    timer = Timer()
    trainer = GRPOTrainer(
        model=load_model(model_dir),
        reward_funcs=[accuracy, fmt],
        args=config,
        train_dataset=dataset,
        processing_class=load_processor(model_dir),
        callbacks=[timer],
    )
    trainer.train()
    steps = [b - a for a, b in zip(timer.marks, timer.marks[1:], strict=False)]
    print(
        "TRL-RESULT "
        + json.dumps({"step_seconds": steps, "completion_length": statistics.mean(timer.lengths)})
    )


def run_trl(args: argparse.Namespace) -> dict:
    argv = [a for a in sys.argv[1:] if a != "--skip-trl"]
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--trl-worker", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    line = next((l for l in proc.stdout.splitlines() if l.startswith("TRL-RESULT ")), None)  # noqa: E741
    if proc.returncode or line is None:
        raise RuntimeError(f"the TRL run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(line.removeprefix("TRL-RESULT "))


def summarise(result: dict, warmup: int) -> dict:
    timed = result["step_seconds"][warmup:] or result["step_seconds"]
    mean = statistics.mean(timed)
    return {**result, "mean_step_seconds": mean, "steps_per_second": 1 / mean}


def report(args: argparse.Namespace, results: dict) -> str:
    lines = [
        f"Training step throughput: small model, {args.image_size}x{args.image_size} images, {args.prompts} prompts"
        f" x {args.group} completions of <= {args.new_tokens} tokens, micro-batch {args.micro_batch}, fp32,"
        f" {args.steps} steps ({args.warmup} warm-up left out), load average before start"
        f" {results['load_average']:.2f}.",
        "",
        "| trainer | s/step | steps/s | mean completion tokens |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in ("ours", "trl"):
        if name in results:
            r = results[name]
            lines.append(
                f"| {name} | {r['mean_step_seconds']:.2f} | {r['steps_per_second']:.4f} | {r['completion_length']:.1f} |"
            )
    if "trl" in results:
        ratio = results["ours"]["steps_per_second"] / results["trl"]["steps_per_second"]
        results["ratio"] = ratio
        lines += ["", f"ours / TRL steps per second: {ratio:.2f}x (target >= 1.5x)"]
    ours = results["ours"]
    lines.append(
        f"ours, per step after warm-up: rollout {statistics.mean(ours['rollout_seconds'][args.warmup :] or ours['rollout_seconds']):.2f} s,"
        f" update {statistics.mean(ours['update_seconds'][args.warmup :] or ours['update_seconds']):.2f} s"
    )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("ours", "trl") if n in results]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(
        names, [results[n]["mean_step_seconds"] for n in names], color=["tab:blue", "tab:gray"][: len(names)]
    )
    ax.set_ylabel("seconds per GRPO step")
    ax.set_title("GRPO step time (lower is better)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.trl_worker:
        trl_worker(args)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"load_average": os.getloadavg()[0], "settings": {k: str(v) for k, v in vars(args).items()}}
    model, data = prepare(args)
    print(f"train_bench: ours ({args.steps} steps) ...", flush=True)
    results["ours"] = summarise(run_ours(args, model, data), args.warmup)
    if not args.skip_trl:
        print(f"train_bench: TRL GRPOTrainer ({args.steps} steps) ...", flush=True)
        results["trl"] = summarise(run_trl(args), args.warmup)
    text = report(args, results)
    atomic_write_text(args.out / "results.md", text)
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=2))
    plot(results, args.out / "steps.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
