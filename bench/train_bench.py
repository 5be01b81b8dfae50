"""Training step throughput: `observe-r1 train` against TRL's GRPOTrainer, same model, data and settings.

    .venv/bin/python bench/train_bench.py [--out DIR] [--settings image-heavy text-heavy] [--steps 4]
        [--rounds 1] [--skip-trl] [--skip-per-sample]

Builds the `small` model (31M parameters) and synthetic problems, then at each setting runs `--steps`
GRPO steps with three trainers, each in its own process: ours (the shared-prefix update), ours with
the per-sample update (`optim.shared_prefix=false`), and TRL's GRPOTrainer. The settings:

- image-heavy: 448 px images (256 image tokens, prompts of about 420 tokens), 64 new tokens;
- text-heavy: 56 px images (4 image tokens), 256 new tokens.

Both: `--prompts` prompts x `--group` completions per step, one optimizer update per step in
micro-batches of `--micro-batch`, fp32, no gradient checkpointing, no reference model (beta 0),
token-mean loss, temperature 1, the same accuracy and format rewards. The first `--warmup` steps of
each run are left out. `--rounds` repeats the three runs of a setting in turn (A B C A B C), so that
a drift of the machine's speed reaches every trainer alike.

Per trainer: seconds per step, generated tokens per second, the step split into rollout (generation
and rewards: ours `time/rollout_s + time/reward_s`, TRL's `_generate_and_score_completions`) and
update (the rest), and the process's peak resident memory (the kernel's accounting of the finished
child, `wait4`). Writes results.json, results.md and steps.png to the output folder, atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from observe_r1.io import atomic_write_text  # noqa: E402


@dataclass(frozen=True)
class Setting:
    image_size: int
    new_tokens: int
    trl_target: float  # ours / TRL steps per second, at least (issue 17)


SETTINGS = {
    "image-heavy": Setting(image_size=448, new_tokens=64, trl_target=3.0),
    "text-heavy": Setting(image_size=56, new_tokens=256, trl_target=1.0),
}
TRAINERS = {
    "ours": "observe-r1 train (shared prefix)",
    "ours-per-sample": "observe-r1 train (per-sample update)",
    "trl": "TRL GRPOTrainer",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "train")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--skip-per-sample", action="store_true")
    p.add_argument("--trl-worker", choices=list(SETTINGS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare(args: argparse.Namespace, setting: Setting) -> tuple[Path, Path]:
    """The small model and `prompts x steps` synthetic problems (built once, reused by later runs)."""
    from observe_r1 import synth, tiny_model

    model = args.out / "model"
    if not (model / "config.json").is_file():
        tiny_model.build(model, size="small", seed=0, overwrite=True)
    data = args.out / f"data-{setting.image_size}px"
    n = args.prompts * args.steps
    if not (data / "data.jsonl").is_file() or len((data / "data.jsonl").read_text().splitlines()) != n:
        synth.generate(data, n=n, seed=0, image_size=setting.image_size, overwrite=True, progress=False)
    return model, data / "data.jsonl"


def run_process(command: list[str]) -> tuple[str, float]:
    """Run `command`; its standard output and its peak resident memory in GiB, from the kernel's
    accounting of the reaped child (`wait4`; Linux counts KiB)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(command[:5])} failed ({proc.returncode}):\n{err.read()[-4000:]}")
        return out.read(), usage.ru_maxrss / 2**20


def run_ours(args: argparse.Namespace, setting: Setting, shared_prefix: bool) -> dict:
    model, data = prepare(args, setting)
    out = args.out / ("ours" if shared_prefix else "ours-per-sample")
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
        f"rollout.max_new_tokens={setting.new_tokens}",
        f"optim.train_batch={args.prompts * args.group}",
        f"optim.micro_batch={args.micro_batch}",
        f"optim.shared_prefix={str(shared_prefix).lower()}",
        "optim.lr=1e-6",
        "optim.warmup_ratio=0",
        f"max_steps={args.steps}",
        "algorithm.agg=token-mean",
        "reward.components={accuracy: 1.0, format: 1.0}",
    ]
    if out.exists():
        shutil.rmtree(out)
    config = str(ROOT / "train/configs/tiny_cpu.yaml")
    command = [sys.executable, "-m", "observe_r1.cli", "train", "--config", config, "--no-progress"]
    _, peak = run_process([*command, *overrides])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rollout = [r["time/rollout_s"] + r["time/reward_s"] for r in rows]
    return {
        "step_seconds": [r["time/step_s"] for r in rows],
        "rollout_seconds": rollout,
        "update_seconds": [r["time/step_s"] - t for r, t in zip(rows, rollout, strict=True)],
        "completion_length": [r["response_length/mean"] for r in rows],
        "peak_rss_gib": peak,
    }


def trl_worker(args: argparse.Namespace, setting: Setting) -> None:
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

    model_dir, data = prepare(args, setting)
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
            self.marks, self.lengths, self.rollout = [], [], []

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
        max_completion_length=setting.new_tokens,
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
    # Generation and rewards: TRL does both in this method, once per optimizer step here.
    generate_and_score = trainer._generate_and_score_completions

    def timed(*a, **kw):
        started = time.perf_counter()
        try:
            return generate_and_score(*a, **kw)
        finally:
            timer.rollout.append(time.perf_counter() - started)

    trainer._generate_and_score_completions = timed
    trainer.train()
    steps = [b - a for a, b in zip(timer.marks, timer.marks[1:], strict=False)]
    result = {
        "step_seconds": steps,
        "rollout_seconds": timer.rollout,
        "update_seconds": [s - r for s, r in zip(steps, timer.rollout, strict=True)],
        "completion_length": timer.lengths,
    }
    print("TRL-RESULT " + json.dumps(result))


def run_trl(args: argparse.Namespace, name: str) -> dict:
    argv = [a for a in sys.argv[1:] if a not in ("--skip-trl", "--skip-per-sample")]
    out, peak = run_process([sys.executable, str(Path(__file__).resolve()), *argv, "--trl-worker", name])
    line = next((l for l in out.splitlines() if l.startswith("TRL-RESULT ")), None)  # noqa: E741
    if line is None:
        raise RuntimeError(f"the TRL run printed no result:\n{out[-4000:]}")
    return {**json.loads(line.removeprefix("TRL-RESULT ")), "peak_rss_gib": peak}


def summarise(runs: list[dict], warmup: int, responses: int) -> dict:
    """Means over every round's steps after the first `warmup` of each run."""

    def timed(key: str) -> list[float]:
        return [x for run in runs for x in (run[key][warmup:] or run[key])]

    step = statistics.mean(timed("step_seconds"))
    length = statistics.mean(timed("completion_length"))
    return {
        "runs": runs,
        "step_seconds": step,
        "steps_per_second": 1 / step,
        "rollout_seconds": statistics.mean(timed("rollout_seconds")),
        "update_seconds": statistics.mean(timed("update_seconds")),
        "completion_length": length,
        "tokens_per_second": length * responses / step,
        "peak_rss_gib": max(run["peak_rss_gib"] for run in runs),
    }


def ratios(setting: Setting, trainers: dict) -> dict:
    """ours / TRL in steps per second (the target), and the update's speed-up from the shared prefix."""
    out = {}
    if "trl" in trainers:
        value = trainers["ours"]["steps_per_second"] / trainers["trl"]["steps_per_second"]
        out["ours_over_trl"] = {
            "value": value,
            "target": setting.trl_target,
            "met": value >= setting.trl_target,
        }
    if "ours-per-sample" in trainers:
        per_sample, shared = trainers["ours-per-sample"], trainers["ours"]
        out["update_speedup"] = per_sample["update_seconds"] / shared["update_seconds"]
        out["step_speedup"] = per_sample["step_seconds"] / shared["step_seconds"]
    return out


def report(args: argparse.Namespace, results: dict) -> str:
    lines = [
        f"GRPO step throughput, small model (31M), {args.prompts} prompts x {args.group} completions per step,"
        f" micro-batch {args.micro_batch}, fp32, {args.steps} steps per run ({args.warmup} warm-up left out),"
        f" {args.rounds} round(s); load average before start {results['load_average']:.2f}.",
        "",
        "| setting | trainer | s/step | generated tok/s | rollout s | update s | peak RSS GiB | mean completion tokens |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, block in results["settings"].items():
        for key, r in block["trainers"].items():
            lines.append(
                f"| {name} | {TRAINERS[key]} | {r['step_seconds']:.2f} | {r['tokens_per_second']:.1f}"
                f" | {r['rollout_seconds']:.2f} | {r['update_seconds']:.2f} | {r['peak_rss_gib']:.2f}"
                f" | {r['completion_length']:.1f} |"
            )
    lines.append("")
    for name, block in results["settings"].items():
        r = block["ratios"]
        if "ours_over_trl" in r:
            t = r["ours_over_trl"]
            verdict = "met" if t["met"] else "NOT met"
            lines.append(
                f"- {name}: ours / TRL steps per second {t['value']:.2f}x (target >= {t['target']:g}x, {verdict})"
            )
        if "update_speedup" in r:
            lines.append(
                f"- {name}: the shared prefix speeds the update up {r['update_speedup']:.2f}x"
                f" (the whole step {r['step_speedup']:.2f}x)"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["settings"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        trainers = results["settings"][name]["trainers"]
        labels = list(trainers)
        rollout = [trainers[k]["rollout_seconds"] for k in labels]
        update = [trainers[k]["update_seconds"] for k in labels]
        ax.bar(labels, rollout, color="tab:gray", label="rollout")
        ax.bar(labels, update, bottom=rollout, color="tab:blue", label="update")
        ax.set_title(name)
        ax.set_ylabel("seconds per GRPO step")
        ax.tick_params(axis="x", labelsize=8)
    axes[0][0].legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.trl_worker:
        trl_worker(args, SETTINGS[args.trl_worker])
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "load_average": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "arguments": {k: str(v) for k, v in vars(args).items()},
        "settings": {},
    }
    runners = {"ours": lambda s, n: run_ours(args, s, True)}
    if not args.skip_per_sample:
        runners["ours-per-sample"] = lambda s, n: run_ours(args, s, False)
    if not args.skip_trl:
        runners["trl"] = lambda s, n: run_trl(args, n)
    for name in args.settings:
        setting = SETTINGS[name]
        prepare(args, setting)
        runs: dict[str, list[dict]] = {key: [] for key in runners}
        for round_ in range(args.rounds):
            for key, run in runners.items():
                print(f"train_bench: {name}, {TRAINERS[key]}, round {round_ + 1}", flush=True)
                runs[key].append(run(setting, name))
        trainers = {k: summarise(v, args.warmup, args.prompts * args.group) for k, v in runs.items()}
        results["settings"][name] = {
            "image_size": setting.image_size,
            "new_tokens": setting.new_tokens,
            "trainers": trainers,
            "ratios": ratios(setting, trainers),
        }
    text = report(args, results)
    atomic_write_text(args.out / "results.md", text)
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=2))
    plot(results, args.out / "steps.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
