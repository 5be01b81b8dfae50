"""`observe-r1 train` / `observe-r1 sft` for real: DeepSpeed ZeRO-2 and ZeRO-3 on the tiny model, one
and two ranks, checkpoints, SIGKILL and resume, the Hugging Face export served over HTTP, and bad
configs refused before anything loads."""

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CLI, free_port
from openai import OpenAI

from observe_r1.modeling import load_model, load_processor
from observe_r1_train.checkpoint import TRAINER_STATE, list_checkpoints
from observe_r1_train.tracking import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "tiny_cpu.yaml"
# The random tiny model scores 0 on accuracy and format; this plug-in reward varies in every
# group, and plain GRPO weights (the Observe-R1 weight is 0 when accuracy is all-wrong) let it act.
LEARNING = ["reward.components={plugins.rewards:letter_share: 1.0}", "algorithm.observe_weight=false"]
STEP_KEYS = {
    "reward/total",
    "accuracy",
    "format_rate",
    "weight/mean",
    "weight/zero_share",
    "advantage/mean",
    "advantage/std",
    "response_length/mean",
    "clip_ratio",
    "entropy",
    "grad_norm",
    "lr",
    "time/rollout_s",
    "time/update_s",
    "time/step_s",
    "loss",
}


def env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        str(TINY),
        "--no-progress",
        f"model.path={model}",
        f"data.paths=[{data / 'data.jsonl'}]",
        f"checkpoint.output_dir={out}",
        *extra,
    ]


def run(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=900, env=env(), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"observe-r1 {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return proc


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_model(folder).state_dict()


@pytest.fixture(scope="module", autouse=True)
def stale_extension_locks(tmp_path_factory):
    """Every run here meets the lock file that a process killed while loading a JIT-compiled op
    leaves in torch's extension cache ($TORCH_EXTENSIONS_DIR/<op>/lock). A trainer that took
    DeepSpeed's CPU shared-memory op would wait on it forever."""
    root = tmp_path_factory.mktemp("torch-extensions")
    (root / "deepspeed_shm_comm").mkdir()
    (root / "deepspeed_shm_comm" / "lock").touch()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_EXTENSIONS_DIR", str(root))
        yield


@pytest.fixture(scope="module")
def zero2_run(qwen_like_model_dir, synth_dir, tmp_path_factory):
    """One ZeRO-2 run of 3 steps, saving every 2 steps and at the end, keeping the last 1, from a base
    whose generation config carries Qwen's near-greedy defaults (which the rollout must not take)."""
    out = tmp_path_factory.mktemp("train") / "zero2"
    args = [
        "max_steps=3",
        "checkpoint.keep_last=1",
        "rollout.temperature=0.9",
        "rollout.top_p=0.95",
        *LEARNING,
    ]
    proc = run(train_args(qwen_like_model_dir, synth_dir, out, *args))
    return out, json.loads(proc.stdout[proc.stdout.index("{") :])


def test_run_writes_metrics_checkpoints_export_and_curves(zero2_run, qwen_like_model_dir):
    out, summary = zero2_run
    assert summary["step"] == summary["total_steps"] == 3
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert STEP_KEYS <= row.keys(), STEP_KEYS - row.keys()
        assert row["weight/mean"] == 1.0 and row["advantage/std"] > 0  # plain weights, varying reward
    assert rows[-1]["lr"] < rows[0]["lr"]  # cosine decay
    # keep_last=1: the step-2 checkpoint is gone once step 3 is saved
    assert [step for step, _ in list_checkpoints(out)] == [3]
    state = json.loads((out / "checkpoints" / "step-00000003" / TRAINER_STATE).read_text())
    assert state["step"] == 3 and state["stream"] == {"epoch": 0, "index": 12}
    assert (out / "curves.png").stat().st_size > 10_000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    rollouts = read_jsonl(out / "rollouts.jsonl")
    assert [r["id"] for r in rollouts] == [f"synth-{i:06d}" for i in range(12)]  # ladder order
    before, after = weights(qwen_like_model_dir), weights(out / "model")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed no weight"
    # The export states the rollout's sampling, not the base checkpoint's top_k=1 and penalty.
    exported = json.loads((out / "model" / "generation_config.json").read_text())
    sampling = {k: exported[k] for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")}
    assert sampling == {
        "do_sample": True,
        "temperature": 0.9,
        "top_p": 0.95,
        "top_k": 0,
        "repetition_penalty": 1.0,
    }


def test_export_loads_and_serves(zero2_run, synth_dir, start_server):
    out, _ = zero2_run
    processor = load_processor(out / "model")
    assert processor.tokenizer.chat_template and processor.image_processor is not None
    server = start_server("--served-model-name", "trained", model=out / "model")
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="none")
    image = base64.b64encode((synth_dir / "images" / "000000.png").read_bytes()).decode()
    content = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        {"type": "text", "text": "How many shapes?"},
    ]
    reply = client.chat.completions.create(
        model="trained", messages=[{"role": "user", "content": content}], max_tokens=8, seed=0
    )
    assert reply.choices[0].finish_reason in {"stop", "length"}
    assert reply.usage.completion_tokens > 0


# Online filtering on, with a reward that is constant in half the groups: every step takes two
# generation rounds to fill its 4 groups (on 2 ranks, each rank keeps 1 of its 2 prompts a round).
FILTERING = [
    "rollout.filter.enabled=true",
    "reward.components={plugins.rewards:half_the_samples: 1.0}",
    "algorithm.observe_weight=false",
]


@pytest.mark.parametrize(("ranks", "filtering"), [(1, False), (2, True)])
def test_kill_and_resume_matches_an_uninterrupted_run(ranks, filtering, tiny_model_dir, synth_dir, tmp_path):
    """SIGKILL after the step-2 checkpoint, resume: same samples in the same order, same metrics
    and the same final weights as a run that was never interrupted, on one rank, and on two with
    online filtering (whose steps read a varying number of prompts)."""
    extra = ["max_steps=4", "checkpoint.save_every=1", "checkpoint.keep_last=2"]
    extra += FILTERING if filtering else LEARNING
    launch = ["--nproc", str(ranks)]
    straight = tmp_path / "straight"
    run([*train_args(tiny_model_dir, synth_dir, straight, *extra), *launch])

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*CLI, *train_args(tiny_model_dir, synth_dir, killed, *extra), *launch],
        env=env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not (killed / "checkpoints" / "step-00000002" / TRAINER_STATE).exists():
        assert proc.poll() is None, "the run ended before it was killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks, as a lost node would
    proc.wait()
    assert not (killed / "model").exists()

    resumed = run([*train_args(tiny_model_dir, synth_dir, killed, *extra), *launch])
    summary = json.loads(resumed.stdout[resumed.stdout.index("{") :])
    assert summary["start_step"] >= 2 and summary["step"] == 4
    ids = [r["id"] for r in read_jsonl(killed / "rollouts.jsonl")]
    assert ids == [r["id"] for r in read_jsonl(straight / "rollouts.jsonl")]
    assert sorted(ids) == [f"synth-{i:06d}" for i in range(32 if filtering else 16)]
    for a, b in zip(
        read_jsonl(straight / "metrics.jsonl"), read_jsonl(killed / "metrics.jsonl"), strict=True
    ):
        assert a["step"] == b["step"]
        assert a["reward/total"] == pytest.approx(b["reward/total"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a.get("filter/rounds") == b.get("filter/rounds") == (2 if filtering else None)
    w1, w2 = weights(straight / "model"), weights(killed / "model")
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=0, atol=1e-6)


def test_online_filtering_fills_each_step_with_groups_that_carry_signal(tiny_model_dir, synth_dir, tmp_path):
    """rollout.filter: groups of equal rewards are dropped and fresh prompts sampled until the step
    holds its 4 groups; the reward metrics cover every response generated; when the data runs out
    inside a step, the run ends at the step before, saved and exported; past max_rounds, a clear
    error."""
    out = tmp_path / "filtered"
    proc = run(train_args(tiny_model_dir, synth_dir, out, "max_steps=3", "data.max_samples=12", *FILTERING))
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert summary["step"] == summary["total_steps"] == 1  # step 2 found 2 of its 4 groups, then no data
    assert "the data ran out during step 2" in proc.stderr
    assert (out / "model" / "config.json").exists()
    state = json.loads((out / "checkpoints" / "step-00000001" / TRAINER_STATE).read_text())
    assert state["stream"] == {"epoch": 0, "index": 8}
    [metrics] = read_jsonl(out / "metrics.jsonl")
    assert metrics["filter/rounds"] == 2 and metrics["filter/kept_share"] == 0.5
    rows = read_jsonl(out / "rollouts.jsonl")
    assert [(r["id"], r["kept"]) for r in rows] == [(f"synth-{i:06d}", i % 4 < 2) for i in range(8)]
    for row in rows:
        assert (row["advantages"] is not None) == row["kept"]
        assert (len(set(row["rewards"])) > 1) == row["kept"]
    # Reward metrics over all 32 responses: the dropped half scored exactly 0.5.
    generated = [r for row in rows for r in row["rewards"]]
    assert metrics["reward/total"] == pytest.approx(sum(generated) / len(generated), abs=1e-3)

    refused = run(
        train_args(
            tiny_model_dir, synth_dir, tmp_path / "refused", "rollout.filter.max_rounds=1", *FILTERING
        ),
        check=False,
    )
    assert refused.returncode != 0
    assert "rollout.filter.max_rounds" in refused.stderr and "Traceback" not in refused.stderr


def assert_same_run(one: Path, two: Path) -> None:
    """Two runs of the same seed and data agree: the same samples with the same rewards and
    advantages, the same step metrics that do not depend on how ranks split the batch, the same
    weights (float tolerance: the ranks batch and reduce in a different order)."""
    rows = {r["id"]: r for r in read_jsonl(one / "rollouts.jsonl")}
    others = {r["id"]: r for r in read_jsonl(two / "rollouts.jsonl")}
    assert sorted(rows) == sorted(others)
    for key, row in rows.items():
        assert others[key]["response"] == row["response"], key
        assert others[key]["rewards"] == pytest.approx(row["rewards"], abs=1e-4), key
        assert others[key]["advantages"] == pytest.approx(row["advantages"], abs=1e-3), key
    for a, b in zip(read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl"), strict=True):
        assert a["step"] == b["step"]
        for key in ("reward/total", "advantage/mean", "loss", "grad_norm", "response_length/mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    w1, w2 = weights(one / "model"), weights(two / "model")
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize(("stage", "launcher"), [(2, "torchrun"), (3, "deepspeed")])
def test_two_ranks_train_what_one_rank_trains(stage, launcher, tiny_model_dir, synth_dir, tmp_path):
    """Prompts split over 2 CPU ranks, each group on one rank: rewards, advantages, loss and the
    parameters after a step (of two optimizer updates) are those of 1 rank, under ZeRO-2 (torchrun,
    through --nproc) and ZeRO-3 (the deepspeed launcher). One rank accumulates two micro-batches per
    update where two ranks take one each, so ZeRO-3 here also checks that accumulation adds the
    micro-batches' gradients. The token-mean is taken over each update's global batch, which differs
    from a per-rank mean here because responses differ in length. One step only: a later step
    samples from weights that agree to float tolerance, and a sampled token can flip on a
    difference that small."""
    extra = ["max_steps=1", f"deepspeed.zero_stage={stage}", *LEARNING]
    one, two = tmp_path / "one", tmp_path / "two"
    run(train_args(tiny_model_dir, synth_dir, one, *extra))
    if launcher == "torchrun":
        run([*train_args(tiny_model_dir, synth_dir, two, *extra), "--nproc", "2"])
    else:
        deepspeed = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2"]
        command = [*deepspeed, "--master_port", str(free_port()), "--module", "observe_r1.cli"]
        proc = subprocess.run(
            [*command, *train_args(tiny_model_dir, synth_dir, two, *extra)],
            capture_output=True,
            text=True,
            timeout=900,
            env=env(),
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_run(one, two)
    ids = [r["id"] for r in read_jsonl(two / "rollouts.jsonl")]
    assert sorted(ids) == [f"synth-{i:06d}" for i in range(4)]
    assert sorted((two / "checkpoints" / "step-00000001").glob("rng-rank*.pt"))[-1].name == "rng-rank1.pt"
    before, after = weights(tiny_model_dir), weights(two / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_bf16_checkpointing_frozen_vision_and_kl_reference(tiny_model_dir, synth_dir, tmp_path):
    """The paper's precision and memory settings plus a KL loss term (which loads a reference model)."""
    out = tmp_path / "bf16"
    extra = [
        "max_steps=2",
        "model.dtype=bf16",
        "model.gradient_checkpointing=true",
        "model.freeze_vision_tower=true",
        "algorithm.kl_coef=0.01",
        *LEARNING,
    ]
    run(train_args(tiny_model_dir, synth_dir, out, *extra))
    rows = read_jsonl(out / "metrics.jsonl")
    assert all("kl" in r and r["kl"] >= 0 for r in rows)
    # the first update starts from the reference itself; only the step's second update has moved
    assert rows[0]["kl"] < 1e-3
    config = json.loads((out / "model" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    before, after = weights(tiny_model_dir), weights(out / "model")
    vision = [k for k in before if ".visual." in k or k.startswith("model.visual")]
    assert vision
    for key in vision:  # frozen, and bf16 round-trips them exactly only if they never moved
        assert torch.equal(before[key].to(torch.bfloat16), after[key].to(torch.bfloat16)), key
    assert any(
        not torch.equal(before[k].to(torch.bfloat16), after[k].to(torch.bfloat16))
        for k in before
        if k not in vision
    )


def test_time_budget_ends_the_run_with_a_checkpoint_and_the_export(tiny_model_dir, synth_dir, tmp_path):
    """`max_time_s` spent after the first step: the run ends there as at its last step (checkpoint,
    export, curves); started again, it finds the budget spent in its checkpoint and trains no more."""
    out = tmp_path / "out"
    args = train_args(tiny_model_dir, synth_dir, out, "max_steps=3", "max_time_s=0.001", *LEARNING)
    first = json.loads((proc := run(args)).stdout[proc.stdout.index("{") :])
    assert first["step"] == 1 and first["total_steps"] == 3 and first["time_up"], first
    assert "max_time_s=0.001 spent" in proc.stderr
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    assert [step for step, _ in list_checkpoints(out)] == [1]
    assert (out / "model" / "config.json").is_file() and (out / "curves.png").is_file()
    again = json.loads((proc := run(args)).stdout[proc.stdout.index("{") :])
    assert again["start_step"] == again["step"] == 1 and again["time_up"], again
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "optim.lrr: unknown key (did you mean 'lr'?)"),
        ("rollout.group_size=one", "rollout.group_size"),
        ("data.paths=[missing.jsonl]", "data.paths[0]: no such file: missing.jsonl"),
        ("model.path=no/such/folder/here", "model.path"),
    ],
)
def test_bad_config_is_refused_before_loading(override, message, tiny_model_dir, synth_dir, tmp_path):
    proc = run(train_args(tiny_model_dir, synth_dir, tmp_path / "out", override), check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    assert "Loading weights" not in proc.stderr  # refused from the config alone, no model load


@pytest.mark.timeout(1200)  # about 2 minutes on an idle 2-core machine; slower ones get room
def test_sft_then_grpo_raises_reward(tiny_model_dir, synth_dir, tmp_path):
    """The evidence that it learns, seeded: a short SFT warm start leaves the tiny model following the
    format about half the time at temperature 1; GRPO then raises the mean reward.

    The tiny model cannot read the images, so its accuracy is at chance and most groups are all
    wrong; the Observe-R1 weight would zero those groups, so this run uses plain GRPO weights and
    the format reward alone: the accuracy reward would add only chance noise to the curve."""
    sft_out = tmp_path / "sft"
    run(
        [
            "sft",
            "--config",
            str(ROOT / "train" / "configs" / "sft_tiny_cpu.yaml"),
            "--no-progress",
            f"model.path={tiny_model_dir}",
            f"data.paths=[{synth_dir / 'data.jsonl'}]",
            f"checkpoint.output_dir={sft_out}",
            "max_steps=100",
        ]
    )
    sft_rows = read_jsonl(sft_out / "metrics.jsonl")
    assert sft_rows[-1]["loss"] < sft_rows[0]["loss"] / 4
    grpo = tmp_path / "grpo"
    steps = [
        "max_steps=24",
        "optim.epochs=5",
        "rollout.prompts_per_step=8",
        "optim.train_batch=16",
        "optim.lr=3e-4",
        "algorithm.observe_weight=false",
        "reward.components={format: 1.0}",
        "checkpoint.save_every=0",
    ]
    run(train_args(sft_out / "model", synth_dir, grpo, *steps))
    rows = read_jsonl(grpo / "metrics.jsonl")
    first, last = rows[:8], rows[-8:]
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "reward/total") > mean(first, "reward/total") + 0.03, [r["reward/total"] for r in rows]
    assert mean(last, "format_rate") > mean(first, "format_rate")
