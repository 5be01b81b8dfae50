"""Online filtering of a step's groups (DAPO's dynamic sampling, arXiv 2503.14476, section 3.2).

A group whose rewards are all equal has zero advantage everywhere, so it adds nothing to the policy
gradient but still dilutes the token-mean and costs an update's compute; with `rollout.filter` on,
the trainer drops such groups (and, optionally, groups whose accuracy lies outside a range) and
samples fresh prompts from the data stream until each rank holds its share of the step's groups.
The predicate is the pure `algorithms.group_filter`; this module holds the batch surgery it needs:
picking groups out of a `RolloutBatch` and joining the batches of several generation rounds.
"""

from __future__ import annotations

import torch

from observe_r1_train.rollout import RolloutBatch


def select_groups(batch: RolloutBatch, groups: list[int]) -> RolloutBatch:
    """The responses of `groups` (indices of prompts in `batch`), in that order, as a batch of its own."""
    g = batch.group_size
    rows = torch.tensor([p * g + k for p in groups for k in range(g)], dtype=torch.long)
    return RolloutBatch(
        samples=[batch.samples[p] for p in groups],
        prompt_inputs=[batch.prompt_inputs[p] for p in groups],
        group_size=g,
        completion_ids=batch.completion_ids[rows],
        completion_mask=batch.completion_mask[rows],
        texts=[batch.texts[r] for r in rows.tolist()],
        finish_reasons=[batch.finish_reasons[r] for r in rows.tolist()],
        pad_id=batch.pad_id,
        timing=dict(batch.timing),
        logprobs=None if batch.logprobs is None else batch.logprobs[rows],
    )


def concat_batches(batches: list[RolloutBatch]) -> RolloutBatch:
    """Several rounds' batches as one, group-contiguous in round order; completions right-padded to
    the widest round (padding holds `pad_id`, mask 0 and log-prob 0, as within a round). Timings add."""
    if not batches:
        raise ValueError("needs at least one batch")
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    width = max(b.completion_ids.shape[1] for b in batches)

    def padded(tensors: list[torch.Tensor], value) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])

    timing: dict[str, float] = {}
    for b in batches:
        for key, seconds in b.timing.items():
            timing[key] = timing.get(key, 0.0) + seconds
    with_logprobs = all(b.logprobs is not None for b in batches)
    return RolloutBatch(
        samples=[s for b in batches for s in b.samples],
        prompt_inputs=[p for b in batches for p in b.prompt_inputs],
        group_size=first.group_size,
        completion_ids=padded([b.completion_ids for b in batches], first.pad_id),
        completion_mask=padded([b.completion_mask for b in batches], 0),
        texts=[t for b in batches for t in b.texts],
        finish_reasons=[r for b in batches for r in b.finish_reasons],
        pad_id=first.pad_id,
        timing=timing,
        logprobs=padded([b.logprobs for b in batches], 0.0) if with_logprobs else None,
    )
