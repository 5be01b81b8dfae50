"""A batch of processed prompts as `generate` inputs: plain left padding, or a cached shared prefix.

Nearly every request starts with the same system turn (the Observe-R1 prompt is 132 of the 223
tokens of a one-image question), and on a CPU the prefill is most of a batch's time. `PrefixCache`
prefills that turn once, keeps its keys and values (a small LRU keyed by the turn's token ids; never
invalidated, as served weights do not change), and starts each batch from a copy expanded to the
batch's rows, so that only the rest of each prompt is prefilled. Rows are laid out as

    [shared prefix][left padding][rest of the prompt]

with attention mask 0 on the padding. A row whose system turn differs (its own system prompt, or
none) keeps its whole prompt after the padding and masks the prefix columns instead. Positions come
from the attention mask (`observe_r1.modeling.position_ids`), so every token sits where it would in
a batch of its own, and the output is the same as without the cache, to float rounding.

The prefix is the system turn only, not the longest prefix the batch shares: a lone request would
otherwise cache its whole prompt, an entry no later request can reuse, and push the useful one out.
"""

from __future__ import annotations

import collections

import torch
from transformers import DynamicCache

from observe_r1.modeling import position_ids

PADDED_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
TURN_START = "<|im_start|>"  # ChatML, Qwen's chat format: every turn opens with it


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad the token tensors of several processed prompts into one batch; stack the rest
    (pixel patches, image grids) in row order, as Qwen2.5-VL expects for a batch."""
    width = max(item["input_ids"].shape[1] for item in items)
    batch: dict[str, torch.Tensor] = {}
    for key in PADDED_KEYS:
        fill = pad_id if key == "input_ids" else 0
        batch[key] = torch.cat(
            [
                torch.nn.functional.pad(item[key], (width - item[key].shape[1], 0), value=fill)
                for item in items
            ]
        )
    for key in {k for item in items for k in item} - set(PADDED_KEYS):
        batch[key] = torch.cat([item[key] for item in items if key in item])
    return batch


def _tail(item: dict, start: int) -> dict:
    """A processed prompt less its first `start` tokens (images are all in the part kept)."""
    return {k: v[:, start:] if k in PADDED_KEYS else v for k, v in item.items()}


class PrefixCache:
    """Keys and values of recently seen system turns, and the batches that start from them."""

    def __init__(self, model, tokenizer, pad_id: int, entries: int = 8):
        self.model = model
        self.pad_id = pad_id
        self.entries = entries
        self._turn_start = tokenizer.get_vocab().get(TURN_START)
        self._system_head = tokenizer(TURN_START + "system", add_special_tokens=False)["input_ids"]
        self._kv: collections.OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = (
            collections.OrderedDict()
        )
        self.hits = 0  # batches that found their prefix cached
        self.misses = 0  # prefixes prefilled

    def system_turn(self, item: dict) -> tuple[int, ...]:
        """The token ids of the prompt's leading system turn, up to the next turn's start; empty when
        the prompt has none (or the template is not ChatML, or the turn holds an image)."""
        ids = item["input_ids"][0].tolist()
        head = self._system_head
        if self._turn_start is None or ids[: len(head)] != head or self._turn_start not in ids[len(head) :]:
            return ()
        end = ids.index(self._turn_start, len(head))
        return () if item["mm_token_type_ids"][0, :end].any() else tuple(ids[:end])

    def inputs(self, items: list[dict]) -> dict | None:
        """`generate` keyword arguments for the batch (on the model's device), starting from the
        system turn most rows share; None when no row has one, for plain padding instead."""
        turns = [self.system_turn(item) for item in items]
        counts = collections.Counter(turn for turn in turns if turn)
        if not counts:
            return None
        prefix = counts.most_common(1)[0][0]
        shares = [turn == prefix for turn in turns]
        batch = self._layout(items, prefix, shares)
        device = self.model.device
        return {
            **{k: v.to(device) for k, v in batch.items()},
            "position_ids": position_ids(self.model, batch).to(device),
            "past_key_values": self._cache(prefix, len(items)),
        }

    def _layout(self, items: list[dict], prefix: tuple[int, ...], shares: list[bool]) -> dict:
        """[prefix][padding][rest] per row; rows that do not share the prefix mask its columns."""
        rest = collate(
            [_tail(item, len(prefix) if s else 0) for item, s in zip(items, shares, strict=True)], self.pad_id
        )
        rows, width = len(items), len(prefix)
        head = {
            "input_ids": torch.tensor(prefix).expand(rows, width),
            "attention_mask": torch.tensor(shares)[:, None].expand(rows, width),
            "mm_token_type_ids": torch.zeros(rows, width),
        }
        return {**rest, **{k: torch.cat([head[k].to(rest[k].dtype), rest[k]], 1) for k in PADDED_KEYS}}

    def _cache(self, prefix: tuple[int, ...], rows: int) -> DynamicCache:
        """A fresh cache holding the prefix for `rows` rows (`generate` extends it in place)."""
        kv = self._kv.get(prefix)
        if kv is None:
            self.misses += 1
            kv = self._kv[prefix] = self._prefill(prefix)
            if len(self._kv) > self.entries:
                self._kv.popitem(last=False)
        else:
            self.hits += 1
            self._kv.move_to_end(prefix)
        expanded = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in kv]
        return DynamicCache(expanded, config=self.model.config)

    def _prefill(self, prefix: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prefix alone through the model: each layer's keys and values, batch size 1."""
        ids = torch.tensor([prefix], device=self.model.device)
        batch = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": torch.zeros_like(ids),
        }
        out = self.model(
            **batch, position_ids=position_ids(self.model, batch), use_cache=True, logits_to_keep=1
        )
        return [(k, v) for k, v, _ in out.past_key_values]
