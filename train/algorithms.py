"""GRPO algorithm pieces for the Observe-R1 recipe, as pure tensor functions.

No model, no I/O, no global state: every function takes tensors (and explicit masks) and
returns tensors, so each one is tested with hand-made numbers. Inputs may be float32 or
bfloat16; all arithmetic is done in float32 (group statistics in float64).

Shapes: N = num_prompts * G responses in *group-contiguous* order (responses 0..G-1 belong
to prompt 0, and so on); T = padded completion length; V = vocabulary size. A `mask` is
(N, T), 1 for generated tokens that count, 0 for padding.

Pipeline order in the trainer: clamp_rewards -> kl_in_reward (optional) -> group_advantages
-> apply_group_weights(combine_weights(observe_r1_weight, prior)) -> policy_loss (+ kl_loss).

Every choice the config offers by name is a registry of pure functions keyed by that name
(DIFFICULTY_WEIGHTS, WEIGHT_COMBINATIONS, AGGREGATIONS, KL_ESTIMATORS, as verl's core_algos
registers its estimators): the config's choices are the registry's keys, so a new mode is one
function and one entry.

Sources: GRPO (DeepSeekMath, arXiv 2402.03300); Observe-R1 (arXiv 2505.12432) and its
authors' OpenRLHF/LMM-R1 code; difficulty prior (arXiv 2505.13261); Dr.GRPO (arXiv
2503.20783); DAPO clip-higher (arXiv 2503.14476); GRPO-LEAD (arXiv 2504.09696) for the
logistic curve; KL estimators k1/k2/k3 (J. Schulman, "Approximating KL divergence").
"""

from __future__ import annotations

import torch

ADV_EPS = 1e-9  # authors: (r - mean) / (std + 1e-9)
WEIGHT_SIGMA = 1.8  # Observe-R1 dynamic weight scale sigma
CLIP_EPS = 0.2  # PPO clip epsilon, both sides by default
REWARD_CLIP = 10.0  # authors clamp rewards to [-10, 10]
KL_REWARD_COEF = 0.01  # authors: k1 KL subtracted from the reward with this coefficient
KL_LOSS_COEF = 0.0  # ours: KL as a loss term is off by default (0.01 to match the authors' strength)
LINEAR_ALPHA = 1.0  # ours: linear difficulty prior slope
LOGISTIC_A, LOGISTIC_B, LOGISTIC_K, LOGISTIC_P0 = 0.4, 1.5, 10.0, 0.75  # GRPO-LEAD curve
LOG_RATIO_LIMIT = 20.0  # log-ratios are clamped to +-20 before exp() so exp never overflows
ENTROPY_CHUNK = 1024  # rows of logits turned into float32 at once in token_entropy


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) -> (N / G, G); refuses an N that is not a multiple of G."""
    if group_size < 1 or x.dim() != 1 or x.numel() % group_size:
        raise ValueError(f"expected a 1-D tensor whose length is a multiple of group_size={group_size}")
    return x.view(-1, group_size)


def _pick(registry: dict, name: str, what: str):
    """registry[name], or a ValueError naming the known names."""
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; expected one of {tuple(registry)}") from None


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) over `dim` (all dims if None), in float32."""
    prod = x.float() * mask.float()
    return prod.sum() if dim is None else prod.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask) over `dim`; an empty mask gives 0, not NaN (count clamped to 1)."""
    count = mask.float().sum() if dim is None else mask.float().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def clamp_rewards(rewards: torch.Tensor, limit: float = REWARD_CLIP) -> torch.Tensor:
    """Clamp rewards to [-limit, limit] (authors' OpenRLHF setting: [-10, 10]); any shape."""
    return rewards.float().clamp(-limit, limit)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    normalize_std: bool = True,
    unbiased_std: bool = True,
    eps: float = ADV_EPS,
) -> torch.Tensor:
    """Group-relative advantage of each response, shape (N,) -> (N,) float32.

    GRPO (DeepSeekMath): A_i = (r_i - mean_g) / (std_g + eps). The std is the *sample* std
    (Bessel, divide by G-1) by default, as in the authors' OpenRLHF/LMM-R1 code
    (`rewards.std(-1)`), TRL (`nanstd`) and oat; `unbiased_std=False` gives the population std.
    Dr.GRPO (arXiv 2503.20783), `normalize_std=False`: A_i = r_i - mean_g.

    Statistics are taken in float64 and a group whose rewards are all equal gets exactly 0:
    with eps = 1e-9, float32 rounding noise (~1e-7) in r - mean would otherwise be divided by
    an std of the same size and turn into O(1) advantages.
    """
    grouped = _grouped(rewards, group_size).double()
    if normalize_std and unbiased_std and group_size < 2:
        raise ValueError("the sample std needs group_size >= 2")
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        std = grouped.std(dim=1, keepdim=True, correction=1 if unbiased_std else 0)
        centred = centred / (std + eps)
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return centred.masked_fill(constant, 0.0).view(-1).float()


def group_accuracy(acc: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group accuracy p = mean_i acc_i, shape (N,) -> (N / G,) float32 (acc_i in {0, 1})."""
    return _grouped(acc, group_size).float().mean(dim=1)


def group_filter(
    rewards: torch.Tensor,
    acc: torch.Tensor,
    group_size: int,
    drop_zero_variance: bool = True,
    min_accuracy: float = 0.0,
    max_accuracy: float = 1.0,
) -> torch.Tensor:
    """Which groups online filtering keeps, shape (N,) -> (N / G,) bool (DAPO's dynamic sampling,
    arXiv 2503.14476): a group is kept when min_accuracy <= p <= max_accuracy and, with
    `drop_zero_variance`, its rewards are not all equal (max_i r_i > min_i r_i). A group of equal
    rewards has A_i = 0 for every response, so it would add no gradient."""
    p = group_accuracy(acc, group_size)
    keep = (p >= min_accuracy) & (p <= max_accuracy)
    if drop_zero_variance:
        grouped = _grouped(rewards, group_size)
        keep &= grouped.amax(dim=1) > grouped.amin(dim=1)
    return keep


def observe_r1_weight(p: torch.Tensor, sigma: float = WEIGHT_SIGMA) -> torch.Tensor:
    """Observe-R1 dynamic weight w = 4 * sigma * d * (1 - d), d = 1 - p (arXiv 2505.12432).

    Computed online from the group's own accuracy. Peaks at sigma for p = 0.5, and is 0 for
    all-right (p = 1) and all-wrong (p = 0) groups, which filters them out. Any shape.
    """
    d = 1.0 - p.float()
    return 4.0 * sigma * d * (1.0 - d)


def linear_difficulty_weight(p: torch.Tensor, alpha: float = LINEAR_ALPHA) -> torch.Tensor:
    """Difficulty prior (arXiv 2505.13261, curve not published; ours): w = 1 + alpha * (1 - p)."""
    return 1.0 + alpha * (1.0 - p.float())


def logistic_difficulty_weight(
    p: torch.Tensor,
    A: float = LOGISTIC_A,
    B: float = LOGISTIC_B,
    k: float = LOGISTIC_K,
    p0: float = LOGISTIC_P0,
) -> torch.Tensor:
    """Difficulty prior, GRPO-LEAD's logistic curve: w = A + (B - A) / (1 + exp(k * (p - p0))).

    Falls from about B for hard groups (p -> 0) to about A for easy ones; w(p0) = (A + B) / 2.
    Written with sigmoid(-z) = 1 / (1 + exp(z)) so large k never overflows.
    """
    return A + (B - A) * torch.sigmoid(-k * (p.float() - p0))


def no_difficulty_weight(p: torch.Tensor) -> torch.Tensor:
    """The "none" prior: w = 1 for every group."""
    return torch.ones_like(p, dtype=torch.float32)


# name -> f(p, **options) -> per-group prior weight
DIFFICULTY_WEIGHTS = {
    "none": no_difficulty_weight,
    "linear": linear_difficulty_weight,
    "logistic": logistic_difficulty_weight,
}


def multiply_weights(observe_w: torch.Tensor, prior_w: torch.Tensor) -> torch.Tensor:
    """Mode "multiply": w = w_obs * w_prior (the Observe-R1 weight, arXiv 2505.12432, scaled by the
    difficulty prior, arXiv 2505.13261); all-right and all-wrong groups keep weight 0."""
    return observe_w.float() * prior_w.float()


def prior_weight_only(observe_w: torch.Tensor, prior_w: torch.Tensor) -> torch.Tensor:
    """Mode "replace": w = w_prior. All-right/all-wrong groups then keep a non-zero weight, but their
    advantages are already 0."""
    return prior_w.float()


def observe_weight_only(observe_w: torch.Tensor, prior_w: torch.Tensor) -> torch.Tensor:
    """Mode "observe_only": w = w_obs, the prior ignored."""
    return observe_w.float()


# name -> f(observe_w, prior_w) -> per-group weight
WEIGHT_COMBINATIONS = {
    "multiply": multiply_weights,
    "replace": prior_weight_only,
    "observe_only": observe_weight_only,
}


def combine_weights(observe_w: torch.Tensor, prior_w: torch.Tensor, mode: str = "multiply") -> torch.Tensor:
    """Combine the Observe-R1 weight with a difficulty-prior weight, per group, by
    `WEIGHT_COMBINATIONS[mode]`."""
    return _pick(WEIGHT_COMBINATIONS, mode, "combine mode")(observe_w, prior_w)


def apply_group_weights(advantages: torch.Tensor, weights: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_i * w_g(i): broadcast one weight per group (N / G,) to advantages (N,) or (N, T)."""
    if weights.numel() * group_size != advantages.shape[0]:
        raise ValueError(f"{weights.numel()} group weights do not cover {advantages.shape[0]} responses")
    per_response = weights.float().repeat_interleave(group_size)
    return advantages.float() * per_response.view(-1, *([1] * (advantages.dim() - 1)))


def token_mean(loss_mat: torch.Tensor, mask: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """Mode "token-mean" (the Observe-R1 authors, DAPO arXiv 2503.14476, TRL "bnpo"):
    sum_it m_it L_it / sum_it m_it. `max_len` is not used."""
    return masked_mean(loss_mat, mask)


def seq_mean_token_mean(
    loss_mat: torch.Tensor, mask: torch.Tensor, max_len: int | None = None
) -> torch.Tensor:
    """Mode "seq-mean-token-mean" (original GRPO, arXiv 2402.03300; TRL "grpo"):
    (1/N) sum_i [sum_t m_it L_it / |o_i|]. Every row counts in the 1/N, an all-padding row
    contributes 0. `max_len` is not used."""
    return masked_mean(loss_mat, mask, dim=-1).mean()


def seq_mean_token_sum_norm(
    loss_mat: torch.Tensor, mask: torch.Tensor, max_len: int | None = None
) -> torch.Tensor:
    """Mode "seq-mean-token-sum-norm" (Dr.GRPO, arXiv 2503.20783): (1/N) sum_i [sum_t m_it L_it / max_len].

    max_len is a constant (the generation budget), as in the Dr.GRPO authors' oat code and TRL
    "dr_grpo". verl's mode of the same name omits the 1/N (its loss grows with N).
    """
    if not max_len:
        raise ValueError("seq-mean-token-sum-norm needs the constant max_len (generation budget)")
    return (masked_sum(loss_mat, mask, dim=-1) / max_len).mean()


# name -> f(loss_mat, mask, max_len) -> scalar loss; one signature, so `aggregate` need not
# know which modes use the generation budget
AGGREGATIONS = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm,
}


def aggregate(
    loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", max_len: int | None = None
) -> torch.Tensor:
    """Reduce a per-token loss (N, T) to a scalar by `AGGREGATIONS[mode]`; L_it = loss_mat,
    m_it = mask, |o_i| = sum_t m_it."""
    return _pick(AGGREGATIONS, mode, "aggregation")(loss_mat, mask, max_len)


def aggregation_units(mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """What `aggregate(·, mask, mode)` averages over, counted: the tokens sum_it m_it for
    "token-mean", the rows N for the sequence means."""
    _pick(AGGREGATIONS, mode, "aggregation")
    return mask.sum() if mode == "token-mean" else torch.tensor(mask.shape[0])


def global_batch_scale(local_units: float, global_units: float, micro_batches: int) -> float:
    """The factor that turns one micro-batch's aggregated loss into its share of the loss of the
    whole optimizer batch, all ranks and accumulated micro-batches together.

    The engine averages gradients over the K = ranks x accumulation micro-batches of an update
    (DeepSpeed divides the loss by the accumulation steps and all-reduces the mean over ranks), so
    a micro-batch's mean over its u_k units (tokens or rows, `aggregation_units`) needs the factor
    s_k = u_k K / sum_j u_j: then (1/K) sum_k s_k mean_k = sum_k sum_k-units L / sum_j u_j, the
    mean over the global batch (DAPO's token-level mean, arXiv 2503.14476, taken over the update's
    batch rather than per rank). With equal u_k, as for row means over equal micro-batches, s_k = 1.
    """
    if global_units <= 0:
        return 0.0
    return local_units * micro_batches / global_units


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = CLIP_EPS,
    clip_high: float = CLIP_EPS,
    agg: str = "token-mean",
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip surrogate with separate low/high epsilon (DAPO clip-higher when clip_high > clip_low).

    r_t = exp(logp_t - old_logp_t); L_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A),
    reduced by `aggregate(L, mask, agg, max_len)`. logprobs/old_logprobs/mask: (N, T);
    advantages: (N,) (one per response) or (N, T). The log-ratio is clamped to
    +-LOG_RATIO_LIMIT before exp.

    Returns (loss, stats); stats are detached token means over the mask: "clip_ratio" (tokens
    where clipping is active, i.e. the gradient is cut: A > 0 and r > 1 + eps_high, or A < 0
    and r < 1 - eps_low; TRL's clip_ratio/region_mean), "clip_ratio_low", "clip_ratio_high",
    "approx_kl" (k1 estimate of KL(old || new): mean(old_logp - logp)) and "ratio_mean".
    """
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    log_ratio = (logprobs.float() - old_logprobs.float()).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    loss = aggregate(per_token, mask, agg, max_len)
    with torch.no_grad():
        low = (ratio < 1.0 - clip_low) & (adv < 0)
        high = (ratio > 1.0 + clip_high) & (adv > 0)
        stats = {
            "clip_ratio": masked_mean((low | high).float(), mask),
            "clip_ratio_low": masked_mean(low.float(), mask),
            "clip_ratio_high": masked_mean(high.float(), mask),
            "approx_kl": masked_mean(-log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def kl_k1(x: torch.Tensor) -> torch.Tensor:
    """k1 = x (unbiased, can be negative; the Observe-R1 authors' reward KL)."""
    return x


def kl_k2(x: torch.Tensor) -> torch.Tensor:
    """k2 = x^2 / 2 (biased, always >= 0, low variance)."""
    return 0.5 * x.square()


def kl_k3(x: torch.Tensor) -> torch.Tensor:
    """k3 = exp(-x) - (-x) - 1 = expm1(-x) + x (unbiased, always >= 0, 0 at x = 0; the usual GRPO
    loss KL). x is clamped to +-LOG_RATIO_LIMIT so exp never overflows."""
    x = x.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return torch.expm1(-x) + x


# name -> f(x) with x = logp - ref_logp (float32, any shape) -> per-token KL estimate
KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi; (N, T).

    Schulman's estimators ("Approximating KL divergence"), `KL_ESTIMATORS[kind]` of the
    log-ratio x = logp - ref_logp.
    """
    estimator = _pick(KL_ESTIMATORS, kind, "KL estimator")
    return estimator(logprobs.float() - ref_logprobs.float())


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    coef: float = KL_LOSS_COEF,
    kind: str = "k3",
    agg: str = "token-mean",
    max_len: int | None = None,
) -> torch.Tensor:
    """KL as a loss term: coef * aggregate(kl_penalty(logp, ref_logp, kind), mask, agg, max_len).

    Aggregated like the policy loss, so policy_loss + kl_loss equals adding coef * KL_t to every
    token before aggregation (TRL's beta term).
    """
    return coef * aggregate(kl_penalty(logprobs, ref_logprobs, kind), mask, agg, max_len)


def kl_in_reward(
    rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, coef: float = KL_REWARD_COEF
) -> torch.Tensor:
    """Sequence-level KL-penalised reward: r_i - coef * sum_t m_it KL_it; (N,), (N, T), (N, T) -> (N,).

    The authors (OpenRLHF/LMM-R1) use k1 with coef 0.01 as a per-token reward: -coef * KL_t at
    every token plus the scalar reward at the last token, then returns-to-go. For an outcome
    reward whose advantage is one number per response, the sequence sum is that return at the
    first token; we apply it before group normalisation so the penalty is group-relative.
    Pass detached log-probs: the reward carries no gradient.
    """
    return rewards.float() - coef * masked_sum(kl, mask, dim=-1)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(z / temperature)[id] per position: (N, T, V), (N, T) -> (N, T) float32.

    log p = z_id / tau - logsumexp(z / tau), one row at a time in float32, so bfloat16 logits of a
    long completion never get a full float32 (N, T, V) copy (TRL's selective_log_softmax does the
    same). Dividing by the sampling temperature scores tokens under the distribution they were
    sampled from, as TRL and verl do.
    """
    rows = []
    for z, i in zip(logits, ids, strict=True):
        z = z.float() / temperature
        rows.append(z.gather(-1, i[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1))
    return torch.stack(rows)


def token_entropy(logits: torch.Tensor, chunk_size: int = ENTROPY_CHUNK) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) per position: (..., V) -> (...) float32.

    H = logsumexp(z) - sum_v softmax(z)_v z_v. Rows are converted to float32 `chunk_size` at a
    time, so bfloat16 logits never get a full float32 copy.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for chunk in flat.split(chunk_size):
        z = chunk.float()
        parts.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1))
    return torch.cat(parts).view(logits.shape[:-1])


def entropy_from_logits(
    logits: torch.Tensor, mask: torch.Tensor, chunk_size: int = ENTROPY_CHUNK
) -> torch.Tensor:
    """Mean token entropy over the mask: masked_mean(token_entropy(logits), mask); (N, T, V) -> ()."""
    return masked_mean(token_entropy(logits, chunk_size), mask)
