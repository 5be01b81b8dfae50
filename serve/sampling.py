"""Next-token sampling for a batch whose rows each bring their own settings (`observe_r1.sampling`:
temperature, top-k, top-p, repetition, presence and frequency penalties) and random draw, and the raw
log-probabilities the server returns.

One vectorised pass over the whole batch: on a 152k-token vocabulary a per-row loop of softmax and
`torch.multinomial` costs about 5 ms a row on a CPU, more than a decoding step of a small model.
"""

from __future__ import annotations

import torch

# Below this temperature a row is decoded greedily, as in vLLM: the tempered distribution is its argmax
# to float precision, and dividing by a float32 near zero would overflow to inf.
GREEDY_BELOW = 1e-5


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative mass exceeds `uniform` x (the row's total mass).

    The total is not assumed to be 1 (rows may be cut by top-p). The result is capped at the last
    index with mass, so a draw that rounds up to the total never lands on a zero-probability token."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:].contiguous()
    picked = torch.searchsorted(cdf, (uniform[:, None] * total).to(cdf.dtype), right=True)
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(picked, last).squeeze(1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Logits (rows x vocabulary) with each row's already-seen tokens penalised, in place.

    For a token in the row's prompt or response so far (`seen`, boolean, rows x vocabulary), a positive
    logit is divided by penalty[r] and a negative one multiplied by it (Keskar et al., 2019, CTRL, as
    transformers and vLLM apply it); penalty 1 leaves the row as it is."""
    factor = torch.where(logits > 0, 1 / penalty[:, None], penalty[:, None]).to(logits.dtype)
    return logits.copy_(torch.where(seen, logits * factor, logits))


def apply_presence_frequency(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """Logits (rows x vocabulary) less, per row, frequency[r] times each token's count in the response
    so far (`counts`) and presence[r] for each token it holds at all, in place (OpenAI's definition,
    as vLLM applies it: the prompt does not count)."""
    return logits.sub_(frequency[:, None] * counts + presence[:, None] * (counts > 0))


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> list:
    """Per row of `logprobs` (rows x vocabulary): the chosen token's log-probability and the k most
    likely (token, log-probability) pairs, most likely first, as Python numbers (one transfer)."""
    picked = logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
    if k == 0:
        return [(p, []) for p in picked]
    values, ids = logprobs.topk(k, dim=-1)
    return [
        (p, list(zip(i, v, strict=True)))
        for p, i, v in zip(picked, ids.tolist(), values.tolist(), strict=True)
    ]


def sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
    top_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token of each row of `logits` (rows x vocabulary).

    Row r is greedy (argmax) when temperature[r] < GREEDY_BELOW. Otherwise p = softmax(logits[r] / temperature[r])
    over the top_k[r] most likely tokens (all of them when top_k[r] is 0 or `top_k` is None); when
    top_p[r] < 1, p keeps only the most likely tokens up to the first whose preceding cumulative mass
    exceeds top_p[r] (nucleus sampling, Holtzman et al., 2020, "The Curious Case of Neural Text
    Degeneration"); the token is then drawn by inverse CDF with uniform[r] in [0, 1). The order, top-k
    before top-p on the tempered distribution, is transformers' and vLLM's.

    A row's token depends only on its own logits and settings and its own `uniform`, so a request
    seeded with its own random stream gets the same tokens whatever it is batched with."""
    chosen = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    greedy = (temperature < GREEDY_BELOW).nonzero().squeeze(1)
    if greedy.numel():
        chosen[greedy] = logits[greedy].argmax(-1)
    sampled = (temperature >= GREEDY_BELOW).nonzero().squeeze(1)
    if sampled.numel() == 0:
        return chosen
    rows = logits if sampled.numel() == logits.shape[0] else logits[sampled]  # no copy in the usual case
    scaled = rows.float() / temperature[sampled, None]
    limited = None if top_k is None else (top_k[sampled] > 0).nonzero().squeeze(1)
    if limited is not None and limited.numel():
        k = top_k[sampled][limited].clamp(max=scaled.shape[1])
        kth = scaled[limited].topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        scaled[limited] = scaled[limited].masked_fill(scaled[limited] < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    draws = uniform[sampled]
    nucleus = top_p[sampled] < 1
    plain = (~nucleus).nonzero().squeeze(1)
    if plain.numel():
        chosen[sampled[plain]] = _inverse_cdf(probs[plain], draws[plain])
    cut = nucleus.nonzero().squeeze(1)
    if cut.numel():
        sorted_probs, order = probs[cut].sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs[before > top_p[sampled[cut], None]] = 0.0
        picked = _inverse_cdf(sorted_probs, draws[cut])
        chosen[sampled[cut]] = order.gather(1, picked[:, None]).squeeze(1)
    return chosen
