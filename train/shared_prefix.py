"""The shared-prefix update: each prompt of a micro-batch runs once, and its responses attend to it.

Prefix Grouper (Liu et al., arXiv 2506.05433, "Shared-Prefix Forward"): the G responses to a prompt
need the prompt's hidden states, keys and values, which are the same for all of them because
attention is causal (a prompt token never sees a response). So instead of G rows
`prompt ⊕ response_i`, one packed row per prompt

    [prompt, left-padded to W][slot 0: a response, right-padded to T] ... [slot K-1]

goes through the model. Every op of a decoder layer other than attention (norms, projections,
MLP, rotary embedding at the given positions) acts on each token alone, so only attention needs
to know the layout, and it splits in two (the paper's grouped attention, its Fig. 1):

- prefix self-attention: the W prompt queries attend causally to the W prompt keys;
- suffix attention: slot j's T queries attend to [the W prompt keys ‖ slot j's own T keys],
  causally within the slot and never to another slot.

A response token thus meets exactly the keys and values it meets in `prompt ⊕ response`, at the
positions it has there (`packed_positions`), so its logits are those of the per-sample forward, and
the gradient reaching the prompt's states is the sum over the responses that share it, which is the
per-sample gradient (the paper proves both equalities; tests/test_shared_prefix.py checks them). The vision tower already runs once per distinct
prompt (`RolloutBatch._image_features`); here the language model does too.

The attention split is registered as a transformers attention implementation (`ATTENTION`) that
behaves as `sdpa` for every ordinary call (generation, the per-sample path, the export) and splits
only when the mask slot carries a `PrefixLayout`; both halves call transformers' own SDPA function,
so the kernels and their numerics are the model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ATTENTION = "observe_r1_shared_prefix"
# Architectures whose text attention goes through transformers' attention interface with the mask
# slot untouched, with text positions that depend only on the token types (so a response's positions
# do not depend on its tokens): checked by tests/test_shared_prefix.py.
SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)


@dataclass(frozen=True)
class PrefixLayout:
    """Where the prompt and the slots sit in the packed rows, and the two attention masks.

    `prefix_attention` (B, 1, W, W) and `suffix_attention` (B * K, 1, T, W + T) are boolean, True
    where a query may attend; built once per forward by `layout`, read by every layer.
    """

    prefix_width: int
    slots: int
    slot_width: int
    prefix_attention: torch.Tensor
    suffix_attention: torch.Tensor


def layout(prefix_mask: torch.Tensor, slots: int, slot_width: int) -> PrefixLayout:
    """The layout of B packed rows: prompts left-padded to W (`prefix_mask` (B, W), 1 on real tokens),
    then `slots` slots of `slot_width` tokens each, every response right-padded in its slot.

    prefix_attention[b, i, j] = (j <= i and prefix_mask[b, j]) or i == j
    suffix_attention[b*K + k, i, j] = prefix_mask[b, j] for j < W, (j - W <= i) for j >= W

    A response's padding (after its end-of-turn token) sits after its real tokens, so causality alone
    keeps it from every query that counts. The diagonal term gives a left-padding query itself to
    attend to, so no softmax row is empty (its output is never read).
    """
    b, w = prefix_mask.shape
    valid = prefix_mask.bool()
    position = torch.arange(w, device=valid.device)
    causal = position[:, None] >= position[None, :]
    prefix = (causal & valid[:, None, :]) | torch.eye(w, dtype=torch.bool, device=valid.device)
    step = torch.arange(slot_width, device=valid.device)
    own = (step[:, None] >= step[None, :]).expand(b, slot_width, slot_width)
    suffix = torch.cat([valid[:, None, :].expand(b, slot_width, w), own], dim=2)
    suffix = suffix.repeat_interleave(slots, dim=0)
    return PrefixLayout(w, slots, slot_width, prefix[:, None], suffix[:, None])


def pack(prefix: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Prefix (B, W, ...) and slots (B, K, T, ...) as packed rows (B, W + K * T, ...)."""
    return torch.cat([prefix, slots.flatten(1, 2)], dim=1)


def packed_positions(
    prefix_positions: torch.Tensor, response_positions: torch.Tensor, slots: int
) -> torch.Tensor:
    """Position ids (C, B, W + K * T) of the packed rows: the prompt's, then each slot with the
    positions (C, B, T) that a response has right after its prompt, the same for every slot."""
    return torch.cat([prefix_positions, response_positions.repeat(1, 1, slots)], dim=2)


def logit_positions(prefix_width: int, slots: int, slot_width: int) -> torch.Tensor:
    """Columns (K * T,) of a packed row whose outputs score each slot's T tokens, slot by slot.

    Token t of a response is predicted by the token before it: the prompt's last token (column
    W - 1, shared by every slot) for t = 0, else the slot's own token t - 1. The per-sample path's
    `logits[:, start - 1 : -1]`, laid out per slot.
    """
    inside = torch.arange(slot_width - 1)
    per_slot = [
        torch.cat([torch.tensor([prefix_width - 1]), prefix_width + k * slot_width + inside])
        for k in range(slots)
    ]
    return torch.cat(per_slot)


def split_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention for the packed rows (prefix self-attention, then suffix attention), or plain SDPA.

    `query` (B, H, W + K*T, D), `key`/`value` (B, H_kv, W + K*T, D); returns (B, W + K*T, H, D) as
    transformers' attention functions do. With any other `attention_mask` than a `PrefixLayout`, this
    is transformers' `sdpa_attention_forward` itself.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(attention_mask, PrefixLayout):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    lay = attention_mask
    w, k, t = lay.prefix_width, lay.slots, lay.slot_width
    kwargs.pop("is_causal", None)  # the masks say it

    def per_slot(x: torch.Tensor) -> torch.Tensor:  # (B, h, K*T, D) -> (B*K, h, T, D)
        return x[:, :, w:].unflatten(2, (k, t)).transpose(1, 2).flatten(0, 1)

    def prompt_and_slot(x: torch.Tensor) -> torch.Tensor:  # keys of each slot: prompt ‖ its own
        return torch.cat([x[:, :, :w].repeat_interleave(k, dim=0), per_slot(x)], dim=2)

    prefix, _ = sdpa_attention_forward(
        module,
        query[:, :, :w],
        key[:, :, :w],
        value[:, :, :w],
        lay.prefix_attention,
        is_causal=False,
        **kwargs,
    )
    suffix, _ = sdpa_attention_forward(
        module,
        per_slot(query),
        prompt_and_slot(key),
        prompt_and_slot(value),
        lay.suffix_attention,
        is_causal=False,
        **kwargs,
    )
    return torch.cat([prefix, suffix.unflatten(0, (-1, k)).flatten(1, 2)], dim=1), None


def register() -> None:
    """Make `ATTENTION` a transformers attention implementation (idempotent): `split_attention`, with
    SDPA's mask builder for the ordinary calls."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, split_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def inexact_reason(model) -> str | None:
    """Why the shared-prefix update would not equal the per-sample one for `model`, or None.

    It is exact when the text model's attention is SDPA (which the split reuses), every layer
    attends to the full causal context (no sliding window), attention has no dropout (a shared prompt
    would share its dropout masks), and the architecture is one whose layout is tested.
    """
    config = model.config
    text = getattr(config, "text_config", config)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if text._attn_implementation not in ("sdpa", ATTENTION):
        return f"its text attention is {text._attn_implementation!r}, not 'sdpa'"
    if set(getattr(text, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        return "it has sliding-window layers"
    if getattr(text, "attention_dropout", 0.0):
        return f"its attention dropout is {text.attention_dropout}"
    return None


def install(model) -> None:
    """Give `model`'s text attention the split (every other call stays SDPA); the vision tower keeps
    its own attention. Raises ValueError when the shared prefix would not be exact for `model`."""
    reason = inexact_reason(model)
    if reason is not None:
        raise ValueError(f"the shared-prefix update is not exact for this model: {reason}")
    register()
    model.set_attn_implementation({"text_config": ATTENTION})


def masks(model, prefix_layout: PrefixLayout) -> dict[str, PrefixLayout]:
    """The `attention_mask` argument that carries `prefix_layout` to every layer: a dict per layer type,
    which the text model takes as already prepared (it is how `generate` hands over its masks)."""
    text = getattr(model.config, "text_config", model.config)
    return dict.fromkeys(getattr(text, "layer_types", None) or ["full_attention"], prefix_layout)


def slot_assignment(prompt_of_row: Sequence[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Distinct prompts in order of first appearance, and each row's (packed row, slot).

    Rows answering the same prompt share its packed row, in the order they come; e.g. prompts
    [0, 0, 1, 0] give prompts [0, 1] and slots [(0, 0), (0, 1), (1, 0), (0, 2)].
    """
    prompts: list[int] = []
    taken: dict[int, int] = {}
    slots = []
    for p in prompt_of_row:
        if p not in taken:
            taken[p] = 0
            prompts.append(p)
        slots.append((prompts.index(p), taken[p]))
        taken[p] += 1
    return prompts, slots
