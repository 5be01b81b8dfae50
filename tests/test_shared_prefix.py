"""The shared-prefix update against the per-sample one, on the tiny Qwen2.5-VL in fp32.

Per-token log-probs and the gradient of every parameter must agree within float tolerance for
prompts with 0, 1 and 2 images of different sizes (so prompts of different lengths are left-padded
in a micro-batch), responses of uneven lengths (right-padded, one of a single token, one holding a
sampled `<|image_pad|>`), groups split across micro-batches and micro-batches spanning groups; with
gradient checkpointing; and a real GRPO run (ZeRO-2 and ZeRO-3, a KL reference model, two updates
per step) must end with the same weights either way. Generation and the export are unchanged."""

import copy

import pytest
import test_rollout
import torch
from test_train_run import run, train_args, weights

from observe_r1.format import SYSTEM_PROMPT
from observe_r1.modeling import load_model, load_processor
from observe_r1.sampling import SamplingParams
from observe_r1_train import algorithms
from observe_r1_train import shared_prefix as sharing
from observe_r1_train.rollout import RolloutBatch, TransformersRollout, process_prompt
from observe_r1_train.tracking import read_jsonl

G = 4
T = 12
LENGTHS = [12, 7, 1, 12, 5, 12, 12, 3, 9, 12, 2, 11]  # per response, 3 groups of G
samples = test_rollout.samples  # the fixture: prompts with 0, 1 and 2 images of two sizes


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def batch(processor, samples) -> RolloutBatch:
    """Three groups of G responses of uneven lengths, drawn at random from the vocabulary."""
    tokenizer = processor.tokenizer
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (len(LENGTHS), T), generator=generator)
    ids[1, 3] = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    mask = (torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]).long()
    pad = tokenizer.pad_token_id
    return RolloutBatch(
        samples=samples,
        prompt_inputs=[process_prompt(processor, s, s.question, SYSTEM_PROMPT) for s in samples],
        group_size=G,
        completion_ids=ids.masked_fill(mask == 0, pad),
        completion_mask=mask,
        texts=[""] * len(LENGTHS),
        finish_reasons=["length"] * len(LENGTHS),
        pad_id=pad,
        timing={},
    )


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """The per-sample model and a copy with the split attention installed, both in train mode."""
    plain = load_model(tiny_model_dir).train()
    shared = copy.deepcopy(plain)
    sharing.install(shared)
    return plain, shared


def test_layout_masks_by_hand():
    lay = sharing.layout(torch.tensor([[0, 1, 1]]), slots=2, slot_width=2)
    assert (lay.prefix_width, lay.slots, lay.slot_width) == (3, 2, 2)
    # the padding query sees only itself; real queries see real keys up to themselves
    assert lay.prefix_attention[0, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    slot = [[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]]  # prompt keys (padding excluded), then causal in the slot
    assert [s[0].int().tolist() for s in lay.suffix_attention] == [slot, slot]


def test_packing_positions_and_logit_columns():
    assert sharing.slot_assignment([0, 0, 1, 0]) == ([0, 1], [(0, 0), (0, 1), (1, 0), (0, 2)])
    assert sharing.slot_assignment([3, 4]) == ([3, 4], [(0, 0), (1, 0)])
    # W = 3, K = 2, T = 3: token 0 of both slots from column 2, then each slot's own tokens
    assert sharing.logit_positions(3, 2, 3).tolist() == [2, 3, 4, 2, 6, 7]
    prefix, slots = torch.arange(6).view(1, 2, 3), torch.arange(12).view(1, 2, 2, 3)
    assert sharing.pack(prefix, slots).tolist() == [
        [[0, 1, 2], [3, 4, 5], *torch.arange(12).view(4, 3).tolist()]
    ]
    positions = sharing.packed_positions(torch.tensor([[[0, 1]]]), torch.tensor([[[2, 3]]]), 2)
    assert positions.tolist() == [[[0, 1, 2, 3, 2, 3]]]


def loss_and_logprobs(model, batch, rows, shared: bool, weights: torch.Tensor):
    """A weighted sum of the rows' masked log-probs (a policy-gradient-shaped loss) and the log-probs."""
    logits = batch.completion_logits(model, rows, shared_prefix=shared)
    mask = batch.completion_mask[rows]
    logprobs = algorithms.token_logprobs(logits, batch.completion_ids[rows]) * mask
    return (logprobs * weights[rows, None]).sum() / mask.sum(), logprobs


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


MICRO_BATCHES = {
    "all rows": [list(range(12))],
    "whole groups": [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]],
    "groups split in two": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]],
    "spanning groups": [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]],
    "mixed order": [[5, 8, 11, 0], [1, 2, 3, 4, 6, 7, 9, 10]],
    "one row": [[6]],
}


@pytest.mark.parametrize("micro_batches", MICRO_BATCHES.values(), ids=MICRO_BATCHES.keys())
def test_logprobs_and_every_gradient_equal_the_per_sample_update(models, batch, micro_batches):
    plain, shared = models
    weights = torch.linspace(-1.0, 1.5, len(LENGTHS))
    for model in models:
        model.zero_grad(set_to_none=True)
    for rows in micro_batches:
        loss_a, lp_a = loss_and_logprobs(plain, batch, rows, False, weights)
        loss_b, lp_b = loss_and_logprobs(shared, batch, rows, True, weights)
        torch.testing.assert_close(lp_b, lp_a, rtol=0, atol=2e-5)
        loss_a.backward()
        loss_b.backward()
    grads_a, grads_b = gradients(plain), gradients(shared)
    assert grads_a.keys() == grads_b.keys() == {n for n, p in plain.named_parameters() if p.requires_grad}
    assert any(".visual." in n for n in grads_a)  # the vision tower is trained through both paths
    for name, grad in grads_a.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_gradient_checkpointing_recomputes_the_split(tiny_model_dir, models, batch):
    plain, shared = models
    checkpointed = copy.deepcopy(shared)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    weights = torch.ones(len(LENGTHS))
    rows = [0, 1, 2, 3, 4, 5]
    for model, use in ((plain, False), (checkpointed, True)):
        model.zero_grad(set_to_none=True)
        loss_and_logprobs(model, batch, rows, use, weights)[0].backward()
    grads_a, grads_b = gradients(plain), gradients(checkpointed)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())


def test_generation_and_export_are_unchanged(tiny_model_dir, processor, samples, tmp_path):
    """Installed, the model still samples as before (SDPA for every ordinary call), and a saved copy
    names no attention implementation of ours."""
    plain = load_model(tiny_model_dir)
    shared = copy.deepcopy(plain)
    sharing.install(shared)
    sampling = SamplingParams(max_tokens=12, seed=3, n=G)
    prompts = [s.question for s in samples]
    a = TransformersRollout(plain, processor).generate(samples, prompts, sampling)
    b = TransformersRollout(shared, processor).generate(samples, prompts, sampling)
    assert torch.equal(a.completion_ids, b.completion_ids)
    shared.save_pretrained(tmp_path / "saved")
    assert sharing.ATTENTION not in (tmp_path / "saved" / "config.json").read_text()
    assert load_model(tmp_path / "saved").config.text_config._attn_implementation == "sdpa"


def test_models_where_it_is_not_exact_are_named(tiny_model_dir):
    assert sharing.inexact_reason(load_model(tiny_model_dir)) is None
    eager = load_model(tiny_model_dir)
    eager.set_attn_implementation("eager")
    assert "'eager', not 'sdpa'" in sharing.inexact_reason(eager)
    dropout = load_model(tiny_model_dir)
    dropout.config.text_config.attention_dropout = 0.1
    assert "dropout" in sharing.inexact_reason(dropout)
    with pytest.raises(ValueError, match="not exact for this model: .*dropout"):
        sharing.install(dropout)


GRPO = [
    "max_steps=1",
    "rollout.group_size=3",
    "optim.train_batch=6",  # 12 responses: two updates per step, so the old log-probs are scored too
    "optim.micro_batch=2",  # micro-batches split groups ([0, 1], [2 | 3]) and span them
    "algorithm.kl_coef=0.05",  # a k3 KL loss term: the reference model is scored the same way
    "algorithm.observe_weight=false",
    "reward.components={plugins.rewards:letter_share: 1.0}",
    "checkpoint.save_every=0",
]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_grpo_step_gives_the_same_weights_on_and_off(tiny_model_dir, synth_dir, tmp_path, zero_stage):
    outs = {}
    for setting in ("true", "false"):
        outs[setting] = tmp_path / setting
        extra = [*GRPO, f"deepspeed.zero_stage={zero_stage}", f"optim.shared_prefix={setting}"]
        run(train_args(tiny_model_dir, synth_dir, outs[setting], *extra))
    on, off = (read_jsonl(outs[s] / "metrics.jsonl")[0] for s in ("true", "false"))
    assert on["kl"] == pytest.approx(off["kl"], abs=1e-6) and on["loss"] == pytest.approx(
        off["loss"], abs=1e-6
    )
    before, a, b = weights(tiny_model_dir), weights(outs["true"] / "model"), weights(outs["false"] / "model")
    assert any(not torch.equal(before[k], a[k]) for k in before), "the step changed no weight"
    # Adam divides each gradient by its own running magnitude, so float rounding in a small gradient
    # moves its step by a share of the learning rate (1e-4 here): allow 5% of one step.
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=5e-6, msg=key)
