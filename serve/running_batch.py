"""The rows decoded together under continuous batching: one KV cache that new rows join and finished
rows leave between decoding steps.

Rows are left-aligned to the batch's width: a row shorter than the batch has zero keys and values
(attention mask 0) in its leftmost columns, so it attends to exactly what it would alone. Every row
carries its own next position ids (Qwen2.5-VL's four rows: the 1-D text position, then the 3-D mrope
one; `observe_r1.modeling.position_ids`), each advanced by one per step as `generate` does, so a row's
logits do not depend on when it joined or on its neighbours, to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from observe_r1.modeling import position_ids

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (rows, heads, columns, head dim)


def _kv(cache: DynamicCache) -> KV:
    return [(k, v) for k, v, _ in cache]


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim)


@dataclass
class RunningBatch:
    # Kept across steps, which extend it in place: building a cache from tensors copies all of them.
    cache: DynamicCache
    mask: torch.Tensor  # (rows, columns): 1 where a column holds one of the row's tokens
    next_positions: torch.Tensor  # (4, rows, 1): the position ids of each row's next token
    config: object  # the model's, for the cache's layer types

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @classmethod
    @torch.inference_mode()
    def prefill(cls, model, inputs: dict) -> tuple[RunningBatch, torch.Tensor]:
        """Run prompts (as `generate` inputs: plainly padded, or from a cached prefix with its own
        `past_key_values` and `position_ids`) and start a batch of them; also return each row's
        logits for its first new token, (rows, vocabulary)."""
        inputs = dict(inputs)
        positions = inputs.pop("position_ids", None)
        if positions is None:
            positions = position_ids(model, inputs).to(model.device)
        # Tokens already in a given cache are not fed again (as `generate` slices them off).
        cached = inputs["past_key_values"].get_seq_length() if "past_key_values" in inputs else 0
        for key in ("input_ids", "mm_token_type_ids"):
            inputs[key] = inputs[key][:, cached:]
        positions = positions[..., cached:]
        out = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
        batch = cls(out.past_key_values, inputs["attention_mask"], positions[..., -1:] + 1, model.config)
        return batch, out.logits[:, -1].float()

    @torch.inference_mode()
    def step(self, model, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row's latest token (rows,); return the logits for the next one."""
        mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], 1)
        out = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=self.next_positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.mask, self.next_positions = mask, self.next_positions + 1
        return out.logits[:, -1].float()

    def join(self, other: RunningBatch) -> RunningBatch:
        """This batch's rows followed by `other`'s, the shorter side padded on the left."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        kv = [
            (
                torch.cat([_pad_left(k, width, 2), _pad_left(k2, width, 2)]),
                torch.cat([_pad_left(v, width, 2), _pad_left(v2, width, 2)]),
            )
            for (k, v), (k2, v2) in zip(_kv(self.cache), _kv(other.cache), strict=True)
        ]
        mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(other.mask, width, 1)])
        positions = torch.cat([self.next_positions, other.next_positions], 1)
        return RunningBatch(DynamicCache(kv, config=self.config), mask, positions, self.config)

    def keep(self, rows: list[int]) -> RunningBatch:
        """Only the given rows, without the leading columns none of them uses any more."""
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[index]
        used = mask.any(0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        kv = [(k[index, :, start:], v[index, :, start:]) for k, v in _kv(self.cache)]
        cache = DynamicCache(kv, config=self.config)
        return RunningBatch(cache, mask[:, start:], self.next_positions[:, index], self.config)
