"""The trainer's pure parts: LR schedule, prompt stream and hints, DeepSpeed config, SFT targets,
checkpoint discovery and metric-file truncation on resume."""

import json
import math

import pytest
import torch

from observe_r1.data import Sample
from observe_r1.format import parse
from observe_r1_train import checkpoint
from observe_r1_train.engine import cosine_lr_factor, deepspeed_config, warmup_steps
from observe_r1_train.prompts import DataExhausted, PromptStream, prompt_text
from observe_r1_train.sft import TargetConfig, sft_target
from observe_r1_train.tracking import plot_curves, read_jsonl, truncate_after


def samples(n: int) -> list[Sample]:
    return [Sample(str(i), [], f"q{i}", "1") for i in range(n)]


def test_cosine_schedule_with_warmup_and_floor():
    total, warm, floor = 100, warmup_steps(100, 0.03), 0.1
    assert warm == 3
    factors = [cosine_lr_factor(s, total, warm, floor) for s in range(total + 5)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert factors[3] == pytest.approx(1.0)
    mid = 3 + (total - 3) / 2
    assert cosine_lr_factor(mid, total, warm, floor) == pytest.approx(floor + (1 - floor) / 2)
    assert factors[total] == pytest.approx(floor) and factors[-1] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False))  # never rises after warm-up
    assert cosine_lr_factor(0, 10, 0, 0.0) == 1.0


def test_stream_reads_the_ladder_in_order_and_drops_the_partial_batch():
    stream = PromptStream(samples(10), batch_size=4, epochs=2)
    assert stream.total_steps == 4
    ids = [[s.id for s in stream.next_batch()] for _ in range(4)]
    assert ids == [["0", "1", "2", "3"], ["4", "5", "6", "7"], ["0", "1", "2", "3"], ["4", "5", "6", "7"]]
    with pytest.raises(DataExhausted):
        stream.next_batch()


def test_stream_shuffle_is_seeded_per_epoch_and_resumes_exactly():
    a = PromptStream(samples(12), batch_size=3, epochs=2, shuffle=True, seed=7)
    first = [[s.id for s in a.next_batch()] for _ in range(8)]
    epoch0, epoch1 = sum(first[:4], []), sum(first[4:], [])
    assert sorted(epoch0, key=int) == sorted(epoch1, key=int) == [str(i) for i in range(12)]
    assert epoch0 != epoch1 and epoch0 != [str(i) for i in range(12)]
    b = PromptStream(samples(12), batch_size=3, epochs=2, shuffle=True, seed=7)
    for _ in range(5):
        b.next_batch()
    c = PromptStream(samples(12), batch_size=3, epochs=2, shuffle=True, seed=7)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert [[s.id for s in c.next_batch()] for _ in range(3)] == first[5:]


def test_stream_refuses_data_smaller_than_a_step():
    with pytest.raises(ValueError, match="fewer than one step's 8 prompts"):
        PromptStream(samples(5), batch_size=8)


def test_difficulty_hints_come_from_the_row():
    hinted = Sample("h", [], "What is x?", "1", difficulty=0.875, hint="HINT")
    plain = Sample("p", [], "What is y?", "1", difficulty=0.875)
    assert prompt_text(hinted, with_hint=True) == "HINT\n\nWhat is x?"
    assert prompt_text(hinted, with_hint=True, position="append") == "What is x?\n\nHINT"
    assert prompt_text(hinted, with_hint=False) == "What is x?"  # hints.enabled off: the question alone
    assert (
        prompt_text(plain, with_hint=True) == "What is y?"
    )  # no hint written: none invented from difficulty


def test_deepspeed_config_merges_extra_last():
    cfg = deepspeed_config(
        train_batch=8,
        micro_batch=2,
        grad_accumulation=4,
        zero_stage=3,
        bf16=True,
        grad_clip=1.0,
        extra={"zero_optimization": {"reduce_bucket_size": 1000}, "bf16": {"enabled": False}},
    )
    assert cfg["train_batch_size"] == 8 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 1000
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert cfg["bf16"] == {"enabled": False}


def test_sft_targets_are_well_formed():
    plain = Sample("a", [], "q", "42")
    result = parse(sft_target(plain, TargetConfig()))
    assert result.format_ok and result.answer == "42"
    fields = Sample("b", [], "q", "7", extra={"observation": "three dots", "reasoning": "3 + 4"})
    result = parse(sft_target(fields, TargetConfig()))
    assert (result.observation, result.reasoning, result.answer) == ("three dots", "3 + 4", "7")
    own = Sample(
        "c", [], "q", "7", extra={"response": "<observe>o</observe><think>t</think><answer>7</answer>"}
    )
    assert sft_target(own, TargetConfig()) == own.extra["response"]


def test_checkpoints_only_complete_folders_count(tmp_path):
    root = tmp_path / checkpoint.CHECKPOINTS
    for name, complete in (("step-00000002", True), ("step-00000010", True), ("step-00000012", False)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / checkpoint.TRAINER_STATE).write_text("{}")
    (root / ".step-00000014.partial").mkdir()
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [2, 10]
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-00000010"
    checkpoint.remove_partial(tmp_path)
    assert not (root / ".step-00000014.partial").exists()
    assert checkpoint.latest_checkpoint(tmp_path / "nowhere") is None


def test_resume_truncates_metrics_and_plot(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "reward/total": s / 10, "lr": 1e-3}) + "\n" for s in range(1, 6))
    )
    truncate_after(path, 3)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    png = plot_curves(path, tmp_path / "curves.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert plot_curves(tmp_path / "none.jsonl", tmp_path / "x.png") is None
    assert math.isclose(read_jsonl(path)[-1]["reward/total"], 0.3)


def test_sft_targets_follow_the_format_variant():
    plain = Sample("a", [], "q", "7")
    think = sft_target(plain, TargetConfig(), "think")
    assert parse(think, variant="think").format_ok and "<observe>" not in think
    own = Sample(
        "c", [], "q", "7", extra={"response": "<observe>o</observe><think>t</think><answer>7</answer>"}
    )
    assert sft_target(own, TargetConfig(), "think") == "<think>t</think>\n<answer>7</answer>"
    assert sft_target(own, TargetConfig()) == own.extra["response"]


def test_pooled_std_over_ranks_is_the_std_of_all_values():
    """`advantage/std` pools every rank's count, sum and sum of squares: the deviation of all the values,
    not the mean of each rank's (which misses the spread between ranks)."""
    from observe_r1_train.trainer import pooled_std

    ranks = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([3.0, 3.0, 3.0])]
    sums = [
        sum(x)
        for x in zip(*[(r.numel(), r.sum().item(), r.square().sum().item()) for r in ranks], strict=True)
    ]
    assert pooled_std(*sums) == pytest.approx(torch.cat(ranks).std().item())
    assert pooled_std(*sums) > 1.0 > sum(r.std().item() for r in ranks) / 2
    assert pooled_std(1, 5.0, 25.0) == 0.0
