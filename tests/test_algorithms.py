"""observe_r1_train.algorithms: every function on hand-made tensors (arithmetic in the comments),
properties with hypothesis, and the losses against TRL's own GRPO code where the settings agree."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from observe_r1_train import algorithms as alg

T = torch.tensor
LN2 = math.log(2.0)


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------- advantages


def test_grpo_advantage_uses_sample_std_by_default():
    # group 1: [1.5, 0, 0, 0]: mean 0.375, deviations [1.125, -0.375 x3]
    #   sum of squares 1.265625 + 3 * 0.140625 = 1.6875; sample var 1.6875 / 3 = 0.5625 -> std 0.75
    #   A = [1.125 / 0.75, -0.375 / 0.75 ...] = [1.5, -0.5, -0.5, -0.5]
    # group 2: [1, 0, 1, 0]: mean 0.5, deviations +-0.5, sample var 4 * 0.25 / 3 = 1/3 -> std 0.57735
    #   A = +-0.5 / 0.57735 = +-0.866025
    r = T([1.5, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    s = 0.5 / math.sqrt(1 / 3)
    close(alg.group_advantages(r, 4), [1.5, -0.5, -0.5, -0.5, s, -s, s, -s])


def test_population_std_option():
    # population var of group 1 = 1.6875 / 4 = 0.421875 -> std 0.649519 = sqrt(3)/2 * 0.75
    #   A = [1.125 / 0.649519, -0.375 / 0.649519] = [sqrt(3), -1/sqrt(3)]
    a = alg.group_advantages(T([1.5, 0.0, 0.0, 0.0]), 4, unbiased_std=False)
    r3 = math.sqrt(3.0)
    close(a, [r3, -1 / r3, -1 / r3, -1 / r3])


def test_dr_grpo_advantage_is_centred_only():
    # Dr.GRPO: A = r - mean = [1.5 - 0.375, -0.375, -0.375, -0.375]
    close(
        alg.group_advantages(T([1.5, 0.0, 0.0, 0.0]), 4, normalize_std=False), [1.125, -0.375, -0.375, -0.375]
    )


def test_equal_rewards_give_exact_zeros_not_nan():
    # 8 x 1.7 in float32: r - mean is rounding noise (~1e-7), std the same noise; the group is
    # detected as constant and gets exactly 0 (no NaN, no +-1 from noise / (noise + 1e-9)).
    r = torch.cat([torch.full((8,), 1.7), torch.zeros(8), T([1.7, 1.7, 1.5, 0.5, 0.0, 1.0, 1.7, 0.0])])
    a = alg.group_advantages(r, 8)
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    assert (a[:16] == 0).all() and (a[16:] != 0).all()
    assert (alg.group_advantages(r, 8, normalize_std=False)[:16] == 0).all()


def test_group_shape_is_checked():
    with pytest.raises(ValueError):
        alg.group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError):
        alg.group_advantages(torch.zeros(3), 1)  # sample std of one value is undefined
    close(alg.group_advantages(T([2.0, 3.0]), 1, normalize_std=False), [0.0, 0.0])


def test_bfloat16_rewards_are_accepted():
    a = alg.group_advantages(T([1.5, 0.0, 0.0, 0.0], dtype=torch.bfloat16), 4)
    assert a.dtype == torch.float32
    close(a, [1.5, -0.5, -0.5, -0.5])


def test_clamp_rewards():
    close(alg.clamp_rewards(T([-20.0, -10.0, 0.5, 12.0])), [-10.0, -10.0, 0.5, 10.0])
    close(alg.clamp_rewards(T([3.0, -3.0]), limit=2.0), [2.0, -2.0])


# ----------------------------------------------------------------------------------------------- weights


def test_group_accuracy():
    # [1, 0, 0, 0] -> 1/4, [1, 1, 0, 0] -> 2/4
    close(alg.group_accuracy(T([1, 0, 0, 0, 1, 1, 0, 0]), 4), [0.25, 0.5])


def test_group_filter_keeps_groups_with_signal_in_the_accuracy_range():
    g = 4
    rewards = torch.tensor([1.5, 1.5, 1.5, 1.5, 1.5, 0.5, 0.5, 0.0, 0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 0.0, 0.0])
    acc = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])
    assert alg.group_filter(rewards, acc, g).tolist() == [False, True, False, True]
    assert alg.group_filter(rewards, acc, g, drop_zero_variance=False).tolist() == [True] * 4
    # accuracy 1, 0.25, 0, 0.25 against the range [0.2, 0.9]
    assert alg.group_filter(rewards, acc, g, False, 0.2, 0.9).tolist() == [False, True, False, True]
    assert alg.group_filter(rewards, acc, g, True, 0.5, 1.0).tolist() == [False] * 4


def test_observe_r1_weight_values():
    # w = 4 * 1.8 * d * (1 - d), d = 1 - p
    #   p = 0: d = 1 -> 0;  p = 0.5: 7.2 * 0.25 = 1.8;  p = 1: d = 0 -> 0
    #   p = 0.25: d = 0.75 -> 7.2 * 0.75 * 0.25 = 1.35;  p = 0.75: d = 0.25 -> 1.35 (symmetric)
    close(alg.observe_r1_weight(T([0.0, 0.5, 1.0, 0.25, 0.75])), [0.0, 1.8, 0.0, 1.35, 1.35])
    # sigma = 1: p = 0.5 -> 4 * 1 * 0.25 = 1
    close(alg.observe_r1_weight(T([0.5]), sigma=1.0), [1.0])


def test_linear_difficulty_weight():
    # w = 1 + 1 * (1 - p): p = 0 -> 2, p = 0.5 -> 1.5, p = 1 -> 1;  alpha = 0.5, p = 0 -> 1.5
    close(alg.linear_difficulty_weight(T([0.0, 0.5, 1.0])), [2.0, 1.5, 1.0])
    close(alg.linear_difficulty_weight(T([0.0]), alpha=0.5), [1.5])


def test_logistic_difficulty_weight():
    # w = 0.4 + 1.1 / (1 + exp(10 (p - 0.75)))
    #   p = 0.75: 0.4 + 1.1 / 2 = 0.95 = (A + B) / 2
    #   p = 0: 0.4 + 1.1 / (1 + e^-7.5) = 1.499392;  p = 1: 0.4 + 1.1 / (1 + e^2.5) = 0.483444
    expect = [0.95, 0.4 + 1.1 / (1 + math.exp(-7.5)), 0.4 + 1.1 / (1 + math.exp(2.5))]
    close(alg.logistic_difficulty_weight(T([0.75, 0.0, 1.0])), expect)
    close(alg.logistic_difficulty_weight(T([0.5]), A=0.0, B=2.0, k=4.0, p0=0.5), [1.0])
    assert alg.logistic_difficulty_weight(T([0.0]), k=1e6).isfinite().all()


def test_difficulty_registry():
    p = T([0.0, 0.5])
    assert set(alg.DIFFICULTY_WEIGHTS) == {"none", "linear", "logistic"}
    close(alg.DIFFICULTY_WEIGHTS["none"](p), [1.0, 1.0])
    close(alg.DIFFICULTY_WEIGHTS["linear"](p, alpha=2.0), [3.0, 2.0])
    close(alg.DIFFICULTY_WEIGHTS["logistic"](T([0.75])), [0.95])


def test_combine_weights():
    # obs [0, 1.8, 1.35] (p = 0, 0.5, 0.25), prior linear [2, 1.5, 1.75]
    #   multiply: [0, 2.7, 2.3625]; replace: prior; observe_only: obs
    obs, prior = T([0.0, 1.8, 1.35]), T([2.0, 1.5, 1.75])
    close(alg.combine_weights(obs, prior, "multiply"), [0.0, 2.7, 2.3625])
    close(alg.combine_weights(obs, prior, "replace"), prior)
    close(alg.combine_weights(obs, prior, "observe_only"), obs)
    with pytest.raises(ValueError):
        alg.combine_weights(obs, prior, "add")


def test_apply_group_weights_broadcasts_per_group():
    # weights [2, 0.5] for groups of 4: [1.5, -0.5, -0.5, -0.5] * 2, [1, -1, 1, -1] * 0.5
    adv = T([1.5, -0.5, -0.5, -0.5, 1.0, -1.0, 1.0, -1.0])
    out = alg.apply_group_weights(adv, T([2.0, 0.5]), 4)
    close(out, [3.0, -1.0, -1.0, -1.0, 0.5, -0.5, 0.5, -0.5])
    # (N, T) per-token advantages: every token of a response gets its group's weight
    close(alg.apply_group_weights(adv[:, None].expand(8, 3), T([2.0, 0.5]), 4), out[:, None].expand(8, 3))
    with pytest.raises(ValueError):
        alg.apply_group_weights(adv, T([1.0, 1.0, 1.0]), 4)


def test_observe_weight_zeroes_all_right_and_all_wrong_groups_end_to_end():
    # group A all right (p = 1), group B half right (p = 0.5, w = 1.8), group C all wrong (p = 0)
    acc = T([1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
    r = acc * 1.0 + 0.5  # accuracy + format
    w = alg.observe_r1_weight(alg.group_accuracy(acc, 4))
    close(w, [0.0, 1.8, 0.0])
    s = 1.8 * 0.5 / math.sqrt(1 / 3)  # 1.8 * 0.866025 (see the first test)
    close(alg.apply_group_weights(alg.group_advantages(r, 4), w, 4), [0] * 4 + [s, -s, s, -s] + [0] * 4)


# ----------------------------------------------------------------------------------------------- aggregation

# response 0 has 1 token (loss 1; the 9s are padding), response 1 has 3 tokens (2, 3, 4)
LOSS = T([[1.0, 9.0, 9.0], [2.0, 3.0, 4.0]])
MASK = T([[1, 0, 0], [1, 1, 1]])


def test_aggregation_modes_on_a_ragged_mask():
    # token-mean: (1 + 2 + 3 + 4) / 4 = 2.5
    close(alg.aggregate(LOSS, MASK, "token-mean"), 2.5)
    # seq-mean-token-mean: mean(1 / 1, 9 / 3) = mean(1, 3) = 2
    close(alg.aggregate(LOSS, MASK, "seq-mean-token-mean"), 2.0)
    # Dr.GRPO, max_len 4: mean(1 / 4, 9 / 4) = (0.25 + 2.25) / 2 = 1.25
    close(alg.aggregate(LOSS, MASK, "seq-mean-token-sum-norm", max_len=4), 1.25)
    with pytest.raises(ValueError):
        alg.aggregate(LOSS, MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError):
        alg.aggregate(LOSS, MASK, "sum")


def test_dr_grpo_normaliser_is_constant_not_the_padded_length():
    # two more padding columns change nothing: the divisor is max_len, not T or the token count
    padded_loss = torch.cat([LOSS, torch.full((2, 2), 7.0)], dim=1)
    padded_mask = torch.cat([MASK, torch.zeros(2, 2, dtype=MASK.dtype)], dim=1)
    for mode in alg.AGGREGATIONS:
        close(
            alg.aggregate(padded_loss, padded_mask, mode, max_len=4),
            alg.aggregate(LOSS, MASK, mode, max_len=4),
        )
    # the same per-token loss 1 on a 3-token and a 1-token response: Dr.GRPO weighs them 3 : 1
    #   mean(3 / 8, 1 / 8) = 0.25, while seq-mean-token-mean gives mean(1, 1) = 1
    ones = torch.ones(2, 3)
    close(alg.aggregate(ones, MASK.flip(0), "seq-mean-token-sum-norm", max_len=8), 0.25)
    close(alg.aggregate(ones, MASK.flip(0), "seq-mean-token-mean"), 1.0)


def test_empty_rows_and_masks_do_not_give_nan():
    mask = T([[1, 1, 0], [0, 0, 0]])
    # seq-mean-token-mean: mean((1 + 9) / 2, 0) = 2.5 (the empty row counts in the 1/N)
    close(alg.aggregate(LOSS, mask, "seq-mean-token-mean"), 2.5)
    close(alg.masked_mean(LOSS, torch.zeros(2, 3)), 0.0)
    close(alg.masked_sum(LOSS, MASK, dim=-1), [1.0, 9.0])


# ----------------------------------------------------------------------------------------------- policy loss


def _one_token_each(ratios, advantages):
    logp = torch.log(T(ratios)).unsqueeze(-1).requires_grad_()
    return logp, torch.zeros_like(logp), T(advantages), torch.ones_like(logp)


def test_clipping_cuts_the_gradient_where_ppo_says_so():
    # four 1-token responses, old logp 0, eps 0.2:
    #   r = 1.5, A = +1: clipped to 1.2 -> L = -1.2, gradient 0
    #   r = 0.5, A = -1: clipped to 0.8 -> L = -min(-0.5, -0.8) = 0.8, gradient 0
    #   r = 1.5, A = -1: unclipped side  -> L = -min(-1.5, -1.2) = 1.5, dL/dlogp = r = 1.5
    #   r = 0.5, A = +1: unclipped side  -> L = -min(0.5, 0.8) = -0.5, dL/dlogp = -r = -0.5
    # token-mean: (-1.2 + 0.8 + 1.5 - 0.5) / 4 = 0.15, gradients / 4
    logp, old, adv, mask = _one_token_each([1.5, 0.5, 1.5, 0.5], [1.0, -1.0, -1.0, 1.0])
    loss, stats = alg.policy_loss(logp, old, adv, mask)
    close(loss, 0.15)
    loss.backward()
    close(logp.grad.squeeze(-1), [0.0, 0.0, 1.5 / 4, -0.5 / 4])
    close(stats["clip_ratio"], 0.5)
    close(stats["clip_ratio_high"], 0.25)
    close(stats["clip_ratio_low"], 0.25)
    close(stats["ratio_mean"], 1.0)  # (1.5 + 0.5 + 1.5 + 0.5) / 4
    close(stats["approx_kl"], -(2 * math.log(1.5) + 2 * math.log(0.5)) / 4)
    assert all(not v.requires_grad for v in stats.values())


def test_clip_higher_uses_separate_epsilons():
    # r = 1.25, A = +1: eps_high 0.2 clips (L = -1.2, grad 0); eps_high 0.28 does not (L = -rA = -1.25,
    #   dL/dlogp = -rA = -1.25)
    # r = 0.75, A = -1: eps_low 0.2 clips (L = 0.8, grad 0) in both cases
    for clip_high, loss_0, grad_0 in [(0.2, -1.2, 0.0), (0.28, -1.25, -1.25)]:
        logp, old, adv, mask = _one_token_each([1.25, 0.75], [1.0, -1.0])
        loss, stats = alg.policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=clip_high)
        close(loss, (loss_0 + 0.8) / 2)
        loss.backward()
        close(logp.grad.squeeze(-1), [grad_0 / 2, 0.0])
        close(stats["clip_ratio_low"], 0.5)


def test_policy_loss_aggregation_and_per_token_advantages():
    # ratio 1 everywhere, A = [2, -1] per response -> L = -A per token = [[-2 pad pad], [1 1 1]]
    #   token-mean: (-2 + 3) / 4 = 0.25; seq-mean-token-mean: (-2 + 1) / 2 = -0.5
    #   Dr.GRPO max_len 3: (-2 / 3 + 3 / 3) / 2 = 1/6
    z = torch.zeros(2, 3)
    adv = T([2.0, -1.0])
    close(alg.policy_loss(z, z, adv, MASK)[0], 0.25)
    close(alg.policy_loss(z, z, adv, MASK, agg="seq-mean-token-mean")[0], -0.5)
    close(alg.policy_loss(z, z, adv, MASK, agg="seq-mean-token-sum-norm", max_len=3)[0], 1 / 6)
    close(alg.policy_loss(z, z, adv[:, None].expand(2, 3), MASK)[0], 0.25)


def test_policy_loss_bfloat16_inputs_compute_in_float32():
    g = torch.Generator().manual_seed(0)
    lp32 = -torch.rand(3, 4, generator=g)
    old = lp32 + 0.3 * torch.randn(3, 4, generator=g)
    adv, mask = T([1.0, -0.5, 0.25]), T([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    lp16 = lp32.bfloat16().requires_grad_()
    loss16, _ = alg.policy_loss(lp16, old.bfloat16(), adv.bfloat16(), mask)
    loss32, _ = alg.policy_loss(lp16.float(), old.bfloat16().float(), adv, mask)
    assert loss16.dtype == torch.float32
    close(loss16, loss32)
    loss16.backward()
    assert lp16.grad.dtype == torch.bfloat16 and lp16.grad.isfinite().all()


def test_extreme_log_ratios_stay_finite():
    logp = T([[200.0, -200.0]]).requires_grad_()
    loss, _ = alg.policy_loss(logp, torch.zeros(1, 2), T([-1.0]), torch.ones(1, 2))
    loss.backward()
    assert loss.isfinite() and logp.grad.isfinite().all()


# ----------------------------------------------------------------------------------------------- KL


def test_kl_estimators_on_a_known_pair():
    # pi = 0.5, pi_ref = 0.25: x = logp - ref = ln 2 = 0.693147
    #   k1 = 0.693147; k2 = 0.5 * 0.480453 = 0.240227; k3 = e^-x + x - 1 = 0.5 + 0.693147 - 1 = 0.193147
    # reversed (pi = 0.25, pi_ref = 0.5): x = -ln 2, k3 = 2 - 0.693147 - 1 = 0.306853
    lp, ref = torch.log(T([0.5, 0.25])), torch.log(T([0.25, 0.5]))
    close(alg.kl_penalty(lp, ref, "k1"), [LN2, -LN2])
    close(alg.kl_penalty(lp, ref, "k2"), [0.5 * LN2**2, 0.5 * LN2**2])
    close(alg.kl_penalty(lp, ref, "k3"), [LN2 - 0.5, 1.0 - LN2])
    for kind in alg.KL_ESTIMATORS:
        close(alg.kl_penalty(lp, lp, kind), [0.0, 0.0])  # zero at equality
    with pytest.raises(ValueError):
        alg.kl_penalty(lp, ref, "k4")


def test_kl_loss_aggregates_like_the_policy_loss():
    # k3 per token: row 0 = [0.193147, pad], row 1 = [0.306853, 0]; coef 0.1
    #   token-mean: 0.1 * (0.193147 + 0.306853 + 0) / 3 = 0.1 * 0.5 / 3 = 0.0166667
    #   seq-mean-token-mean: 0.1 * (0.193147 / 1 + 0.306853 / 2) / 2 = 0.0173364
    lp = torch.log(T([[0.5, 0.9], [0.25, 0.3]]))
    ref = torch.log(T([[0.25, 0.1], [0.5, 0.3]]))
    mask = T([[1, 0], [1, 1]])
    close(alg.kl_loss(lp, ref, mask, coef=0.1), 0.1 * 0.5 / 3)
    close(
        alg.kl_loss(lp, ref, mask, coef=0.1, agg="seq-mean-token-mean"), 0.1 * (LN2 - 0.5 + (1 - LN2) / 2) / 2
    )
    close(alg.kl_loss(lp, ref, mask), 0.0)  # default coef 0.0 (ours): KL loss off


def test_kl_in_reward_subtracts_the_masked_sequence_sum():
    # r = [1.5, 0.5]; KL sums over the mask: 0.1 + 0.2 = 0.3 (99 is padding), 0.3 + 0.5 + 0 = 0.8
    #   coef 0.01: [1.5 - 0.003, 0.5 - 0.008] = [1.497, 0.492]
    kl = T([[0.1, 0.2, 99.0], [0.3, 0.5, 0.0]])
    close(alg.kl_in_reward(T([1.5, 0.5]), kl, T([[1, 1, 0], [1, 1, 1]])), [1.497, 0.492])
    close(alg.kl_in_reward(T([1.5, 0.5]), kl, T([[1, 1, 0], [1, 1, 1]]), coef=1.0), [1.2, -0.3])


# ----------------------------------------------------------------------------------------------- entropy


def test_entropy_of_uniform_and_known_distributions():
    # uniform over V = 7: H = ln 7; p = [0.5, 0.25, 0.25]: H = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2
    close(alg.token_entropy(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)))
    close(alg.token_entropy(torch.log(T([0.5, 0.25, 0.25]))), 1.5 * LN2)
    # masked mean: row 0 tokens uniform over 4 (ln 4), row 1 token 0 peaked (1.5 ln 2 on 4 classes
    # with a -inf-like logit), row 1 token 1 padding -> mean(ln 4, ln 4, 1.5 ln 2) = 5.5 ln 2 / 3
    peaked = torch.log(T([0.5, 0.25, 0.25, 1e-30]))
    logits = torch.stack([torch.zeros(2, 4), torch.stack([peaked, torch.zeros(4)])])
    close(alg.entropy_from_logits(logits, T([[1, 1], [1, 0]])), 5.5 * LN2 / 3, tol=1e-5)


def test_entropy_chunking_and_bfloat16():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(1))
    full = alg.token_entropy(logits)
    close(alg.token_entropy(logits, chunk_size=2), full)
    h16 = alg.token_entropy(logits.bfloat16())
    assert h16.dtype == torch.float32
    close(h16, alg.token_entropy(logits.bfloat16().float()))


# ----------------------------------------------------------------------------------------------- properties

REWARD = st.sampled_from([0.0, 0.5, 1.0, 1.5, 1.7])


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 8).flatmap(lambda g: st.tuples(st.just(g), st.lists(REWARD, min_size=g, max_size=4 * g)))
)
def test_advantages_are_centred_and_unit_std_per_group(case):
    g, rewards = case
    r = T(rewards[: len(rewards) // g * g])
    for normalize in (True, False):
        a = alg.group_advantages(r, g, normalize_std=normalize).view(-1, g)
        close(a.sum(1), torch.zeros(len(a)), tol=1e-5)
    a = alg.group_advantages(r, g).view(-1, g).double()
    # Not `std > 0`: the float32 std of equal values like 1.7 can round to a tiny positive number.
    grouped = r.view(-1, g)
    varied = (grouped != grouped[:, :1]).any(1)
    if varied.any():
        close(a[varied].std(1), torch.ones(int(varied.sum())), tol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.floats(0, 1), st.floats(0.01, 5))
def test_weights_stay_in_their_ranges(p, sigma):
    w = alg.observe_r1_weight(T([p]), sigma=sigma).item()
    assert -1e-6 <= w <= sigma * (1 + 1e-6)
    lo, hi = alg.logistic_difficulty_weight(T([min(p + 0.1, 1.0), p])).tolist()
    assert alg.LOGISTIC_A - 1e-6 <= lo <= hi <= alg.LOGISTIC_B + 1e-6  # non-increasing in p
    assert 1.0 <= alg.linear_difficulty_weight(T([p])).item() <= 2.0


@settings(max_examples=80, deadline=None)
@given(st.floats(-3, 3), st.floats(-5, 5), st.floats(0.05, 0.5), st.floats(0.05, 0.5))
def test_clipped_loss_is_a_pessimistic_bound(log_ratio, adv, eps_low, eps_high):
    # -min(rA, clip(r)A) >= -rA always, with equality when r is inside [1 - eps_low, 1 + eps_high]
    lp = T([[log_ratio]])
    loss = alg.policy_loss(lp, torch.zeros(1, 1), T([adv]), torch.ones(1, 1), eps_low, eps_high)[0].item()
    unclipped = -math.exp(log_ratio) * adv
    assert loss >= unclipped - 1e-5 * (1 + abs(unclipped))
    if 1 - eps_low <= math.exp(log_ratio) <= 1 + eps_high:
        assert math.isclose(loss, unclipped, rel_tol=1e-5, abs_tol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-15, 15), min_size=1, max_size=8), st.lists(st.floats(-15, 15), min_size=8, max_size=8)
)
def test_k3_is_non_negative(x, y):
    assert (alg.kl_penalty(T(x), T(y[: len(x)]), "k3") >= 0).all()


@settings(max_examples=40, deadline=None)
@given(st.floats(-4, 4), st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_constant_loss_aggregates_to_itself(c, lengths):
    mask = (torch.arange(5)[None, :] < T(lengths)[:, None]).float()
    loss = torch.full((len(lengths), 5), c)
    for mode in ("token-mean", "seq-mean-token-mean"):
        close(alg.aggregate(loss, mask, mode), c, tol=1e-5)
    # Dr.GRPO with max_len = 5: mean(c * len_i / 5)
    close(
        alg.aggregate(loss, mask, "seq-mean-token-sum-norm", max_len=5),
        c * sum(lengths) / 5 / len(lengths),
        1e-5,
    )


# ----------------------------------------------------------------------------------------------- TRL


def test_group_std_is_trls_nanstd():
    # TRL's GRPO advantage divides r - mean by nanstd(group) + 1e-4; nanstd is Bessel-corrected,
    # so with eps = 1e-4 our default (unbiased_std=True) gives the same normaliser.
    trl_utils = pytest.importorskip("trl.trainer.utils")
    r = T([1.5, 0.0, 0.0, 0.0, 1.7, 0.5, 1.0, 0.0])
    grouped = r.view(2, 4)
    centred = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    std = trl_utils.nanstd(grouped, dim=1).repeat_interleave(4)
    close(alg.group_advantages(r, 4, eps=1e-4) * (std + 1e-4), centred, tol=1e-5)


def test_token_entropy_matches_trl():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    logits = torch.randn(2, 6, 13, generator=torch.Generator().manual_seed(2))
    close(alg.token_entropy(logits), trl_utils.entropy_from_logits(logits), tol=1e-5)


class _TrlStub:
    """Just enough of a GRPOTrainer for its real `_compute_loss` to run on given log-probs.

    TRL has no pure loss function: the loss lives in the trainer method, which reads these
    attributes and gets the current log-probs from `_get_per_token_logps_and_entropies`.
    """

    def __init__(self, logps, loss_type, beta, eps_low, eps_high, max_len):
        self._logps = logps
        self.loss_type, self.beta, self.epsilon_low, self.epsilon_high = loss_type, beta, eps_low, eps_high
        self.max_completion_length = max_len
        self.top_entropy_quantile, self.off_policy_mask_threshold = 1.0, None
        self.importance_sampling_level = "token"
        self.use_vllm = self.vllm_importance_sampling_correction = False
        self._entropy_bonus_enabled = self.aux_loss_enabled = False
        self.args = SimpleNamespace(delta=None, use_bias_correction_kl=False)
        self.model = SimpleNamespace(training=False)  # eval mode: no gradient-accumulation scaling
        self.current_gradient_accumulation_steps = 1
        self.accelerator = SimpleNamespace(reduce=lambda x, reduction: x, gather=lambda x: x)
        self._metrics = defaultdict(lambda: defaultdict(list))

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        return self._logps, torch.zeros_like(self._logps), None


@pytest.mark.parametrize(
    ("loss_type", "agg"),
    [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean"), ("dr_grpo", "seq-mean-token-sum-norm")],
)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_and_kl_loss_match_trl_grpo_trainer(loss_type, agg, beta):
    grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    g = torch.Generator().manual_seed(3)
    n, t, max_len = 8, 6, 10
    lengths = T([6, 1, 3, 5, 2, 6, 4, 3])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    old = -2 * torch.rand(n, t, generator=g)
    ref = old + 0.2 * torch.randn(n, t, generator=g)
    rewards = T([1.7, 0.0, 0.5, 1.5, 0.0, 1.0, 1.5, 0.5])
    adv = alg.group_advantages(rewards, 4, eps=1e-4)
    new = (old + 0.3 * torch.randn(n, t, generator=g)).requires_grad_()
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long),
        "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(n, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
    }
    stub = _TrlStub(new, loss_type, beta, 0.2, 0.28, max_len)
    trl_loss = grpo.GRPOTrainer._compute_loss(stub, None, inputs)
    (trl_grad,) = torch.autograd.grad(trl_loss, new)

    ours, stats = alg.policy_loss(new, old, adv, mask, clip_low=0.2, clip_high=0.28, agg=agg, max_len=max_len)
    if beta:
        ours = ours + alg.kl_loss(new, ref, mask, coef=beta, kind="k3", agg=agg, max_len=max_len)
    (our_grad,) = torch.autograd.grad(ours, new)
    close(ours, trl_loss, tol=1e-6)
    close(our_grad, trl_grad, tol=1e-6)
    assert stats["clip_ratio"] > 0
    close(stats["clip_ratio"], stub._metrics["eval"]["clip_ratio/region_mean"][0])


@pytest.mark.parametrize(
    ("call", "known"),
    [
        (lambda: alg.combine_weights(T([1.0]), T([1.0]), "add"), alg.WEIGHT_COMBINATIONS),
        (lambda: alg.aggregate(LOSS, MASK, "sum"), alg.AGGREGATIONS),
        (lambda: alg.kl_penalty(T([0.0]), T([0.0]), "k4"), alg.KL_ESTIMATORS),
    ],
)
def test_unknown_names_list_the_registry(call, known):
    with pytest.raises(ValueError, match="expected one of") as e:
        call()
    assert all(name in str(e.value) for name in known)
