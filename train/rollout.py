"""Rollout engines: sample a group of G responses per prompt for GRPO.

The trainer talks to one small interface, `RolloutEngine` (docs/architecture.md: engines sit behind
one small interface each), and never learns which engine runs. `TransformersRollout` samples with the policy
object itself (CPU, tests, small runs); `VLLMRollout` (train/vllm_rollout.py) implements the same three
methods for GPU scale-out, loading the trainer's new weights in `update_weights`, and builds its prompts
with the same `process_prompt`, so the update sees identical inputs whichever engine sampled.

Both engines key their sampling randomness to the sample (`keyed_seed` of the rollout seed and the
sample id; the transformers engine also of the response's index in its group), so a response does
not depend on the rank or the batch it is sampled in: a run on two ranks samples what one rank
samples from the same seed and data.

Every engine returns a `RolloutBatch` in group-contiguous order (response i answers prompt i // G)
holding what the update needs: completion tokens and masks, plus the processed prompts (tokens,
pixels, image grids) from which `RolloutBatch.model_inputs` rebuilds prompt ⊕ completion.
"""

from __future__ import annotations

import abc
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from observe_r1.chat import build_messages, open_images
from observe_r1.data import Sample
from observe_r1.errors import InvalidValue
from observe_r1.format import SYSTEM_PROMPT
from observe_r1.modeling import position_ids, tokenizer_of
from observe_r1.sampling import SamplingParams, end_of_turn_ids, to_generation_config
from observe_r1_train import shared_prefix as sharing

_PADDED_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
_IMAGE_KEYS = ("pixel_values", "image_grid_thw")


def takes_images(processor) -> bool:
    """Whether `processor` is a multimodal one, not a text-only policy's tokenizer."""
    return hasattr(processor, "image_processor")


def keyed_seed(*parts) -> int:
    """A 63-bit seed derived from `parts` (ints and strings), the same in every process and run (Python's
    own `hash` of a string changes from process to process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class KeyedSampler(LogitsProcessor):
    """Draws each row's next token from the row's own random stream, as the last logits processor of
    a greedy `generate`: it warps the scores as sampling would (temperature, then top-k, then top-p,
    transformers' own warpers in transformers' order), draws from the softmax with the row's
    `torch.Generator`, and returns scores that are -inf except at the drawn token, which greedy
    decoding then takes. `generate` itself draws from one global stream for the whole batch, so a
    row's tokens would depend on which rows share its batch."""

    def __init__(self, params: SamplingParams, seeds: list[int], device: torch.device):
        self.warpers = [
            *([TemperatureLogitsWarper(params.temperature)] if params.temperature != 1.0 else []),
            *([TopKLogitsWarper(params.top_k)] if params.top_k else []),
            *([TopPLogitsWarper(params.top_p)] if params.top_p < 1.0 else []),
        ]
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        probs = scores.float().softmax(-1)
        picks = torch.cat(
            [
                torch.multinomial(row, 1, generator=gen)
                for row, gen in zip(probs, self.generators, strict=True)
            ]
        )
        return torch.full_like(scores, -float("inf")).scatter_(1, picks[:, None], 0.0)


def process_prompt(processor, sample: Sample, prompt: str, system_prompt: str | None) -> dict:
    """One prompt through the chat template and processor, unbatched tensors of batch size 1.

    The caller decides `prompt` (e.g. the question plus a difficulty hint); the sample supplies the
    images (local paths), which come first in the user turn, as Qwen expects. A text-only policy's
    tokenizer takes no images; its prompts carry an all-zero `mm_token_type_ids` (no image placeholder),
    so the update lays them out as it does multimodal ones.
    """
    images = open_images(sample.images)
    if images and not takes_images(processor):
        raise InvalidValue(f"sample {sample.id!r} has images, but the policy is a text-only model")
    messages = build_messages(prompt, len(images), system_prompt)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not takes_images(processor):
        inputs = dict(processor(text=[text], return_tensors="pt"))
        return {**inputs, "mm_token_type_ids": torch.zeros_like(inputs["input_ids"])}
    return dict(processor(text=[text], images=images or None, return_tensors="pt"))


def check_prompts(samples: list[Sample], prompts: list[str]) -> None:
    """Every rollout engine takes one prompt per sample, and at least one."""
    if len(samples) != len(prompts) or not samples:
        raise ValueError(f"need one prompt per sample: {len(samples)} samples, {len(prompts)} prompts")


def check_prompt_lengths(samples: list[Sample], inputs: list[dict], limit: int | None) -> None:
    """Refuse prompts longer than `limit` tokens (image tokens included), naming every culprit.

    Truncating would cut image placeholders or the question; a clear error lets the user filter the
    data or raise `rollout.max_prompt_tokens`."""
    if limit is None:
        return
    long = [
        (s.id, p["input_ids"].shape[1])
        for s, p in zip(samples, inputs, strict=True)
        if p["input_ids"].shape[1] > limit
    ]
    if long:
        listed = ", ".join(f"sample {sid!r} has {n}" for sid, n in long)
        raise InvalidValue(f"prompts longer than rollout.max_prompt_tokens = {limit} tokens: {listed}")


def _collate(prompts: list[dict], pad_id: int, image_keys=_IMAGE_KEYS) -> dict[str, torch.Tensor]:
    """Left-pad token tensors to one width (so every row's next token is in the last column) and
    concatenate the `image_keys` (patches, grids) in row order, as Qwen2.5-VL expects for a batch."""
    width = max(p["input_ids"].shape[1] for p in prompts)
    batch = {
        key: torch.cat(
            [
                torch.nn.functional.pad(
                    p[key], (width - p[key].shape[1], 0), value=pad_id if key == "input_ids" else 0
                )
                for p in prompts
            ]
        )
        for key in _PADDED_KEYS
    }
    for key in image_keys:
        parts = [p[key] for p in prompts if key in p]
        if parts:
            batch[key] = torch.cat(parts)
    return batch


@dataclass
class RolloutBatch:
    """N = P * G responses, group-contiguous; completion tensors are right-padded to width T.

    `completion_mask` is 1 up to and including the end-of-turn token (or through the last token for a
    response cut at `max_new_tokens`, finish reason "length"), 0 after; padding holds `pad_id`.
    `prompt_inputs` are the processor outputs per prompt (batch size 1, unpadded). `timing` holds
    seconds spent processing prompts and generating. `logprobs` (N, T) only when requested.
    """

    samples: list[Sample]
    prompt_inputs: list[dict[str, torch.Tensor]]
    group_size: int
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    finish_reasons: list[str]
    pad_id: int
    timing: dict[str, float]
    logprobs: torch.Tensor | None = None

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)

    @property
    def group_index(self) -> torch.Tensor:
        return torch.arange(len(self.texts)) // self.group_size

    @property
    def prompt_ids(self) -> list[torch.Tensor]:
        return [p["input_ids"][0] for p in self.prompt_inputs]

    def model_inputs(self, model, rows: slice | Sequence[int] | None = None) -> tuple[dict, int]:
        """Forward inputs for prompt ⊕ completion of `rows` (default all), on `model`'s device.

        Returns `(inputs, start)`: position `start + t` of `model(**inputs)` holds completion token t
        of `completion_ids[rows]` (weigh by `completion_mask[rows]`), so `logits[:, start - 1 : -1]`
        score the completions. Prompts are left-padded to a common width: one `start` for all rows.

        The inputs are embeddings: `model`'s vision tower runs once per distinct prompt in `rows`
        (once per group when `rows` covers whole groups) and the features go to every response's
        image placeholders, gradients included. Doing it here rather than passing `pixel_values`
        lets the G responses share one encoding on any transformers 5.x, and a sampled
        `<|image_pad|>` in a completion stays the ordinary token that `generate` saw. Call this
        under the same grad mode and autocast as the forward.
        """
        rows = self._rows(rows)
        prompts = [self.prompt_inputs[r // self.group_size] for r in rows]
        batch = _collate(prompts, self.pad_id, image_keys=("image_grid_thw",))
        start = batch["input_ids"].shape[1]
        ids, mask = self.completion_ids[rows], self.completion_mask[rows]
        batch["input_ids"] = torch.cat([batch["input_ids"], ids], 1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], mask], 1)
        batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(ids)], 1)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        inputs = {
            "inputs_embeds": self._embeddings(model, batch, rows),
            "attention_mask": batch["attention_mask"],
        }
        return {**inputs, "position_ids": position_ids(model, batch)}, start

    def completion_logits(
        self, model, rows: slice | Sequence[int] | None = None, shared_prefix: bool = False
    ) -> torch.Tensor:
        """Logits (n, T, V) scoring the completion tokens of `rows`: `model` on prompt ⊕ completion,
        positions start - 1 .. end - 2, computed only there (`logits_to_keep`), so a long prompt costs
        no (prompt length x vocabulary) logits.

        With `shared_prefix` (for a `model` that has `shared_prefix.install` applied, train/shared_prefix.py), each distinct
        prompt of `rows` runs through the language model once and its responses attend to it: the
        same logits, with the prompt's work done once instead of once per response."""
        if shared_prefix:
            return self._shared_prefix_logits(model, self._rows(rows))
        inputs, _ = self.model_inputs(model, rows)
        width = self.completion_ids.shape[1]
        return model(**inputs, use_cache=False, logits_to_keep=width + 1).logits[:, :-1]

    def _shared_prefix_logits(self, model, rows: list[int]) -> torch.Tensor:
        """`completion_logits` on packed rows, one per distinct prompt (train/shared_prefix.py)."""
        prompts, places = sharing.slot_assignment([r // self.group_size for r in rows])
        batch = _collate(
            [self.prompt_inputs[p] for p in prompts], self.pad_id, image_keys=("image_grid_thw",)
        )
        (b, w), t = batch["input_ids"].shape, self.completion_ids.shape[1]
        slots = 1 + max(slot for _, slot in places)
        # A response's positions are those of T text tokens right after its prompt, whatever its tokens
        # (positions follow the token types only), so they are computed once per prompt.
        text = torch.ones(b, t, dtype=batch["attention_mask"].dtype)
        extended = {
            **batch,
            "input_ids": torch.cat([batch["input_ids"], text * self.pad_id], 1),
            "attention_mask": torch.cat([batch["attention_mask"], text], 1),
            "mm_token_type_ids": torch.cat([batch["mm_token_type_ids"], text * 0], 1),
        }
        positions = position_ids(model, {k: v.to(model.device) for k, v in extended.items()})
        row, slot = (torch.tensor(x) for x in zip(*places, strict=True))
        ids = torch.full((b, slots, t), self.pad_id, dtype=self.completion_ids.dtype)
        ids[row, slot] = self.completion_ids[rows]
        batch = {k: v.to(model.device) for k, v in batch.items()}
        prefix = self._embeddings(model, batch, [p * self.group_size for p in prompts])
        packed = sharing.pack(prefix, model.get_input_embeddings()(ids.to(model.device)))
        layout = sharing.layout(batch["attention_mask"], slots, t)
        logits = model(
            inputs_embeds=packed,
            attention_mask=sharing.masks(model, layout),
            position_ids=sharing.packed_positions(positions[..., :w], positions[..., w:], slots),
            use_cache=False,
            logits_to_keep=sharing.logit_positions(w, slots, t).to(model.device),
        ).logits
        return logits.unflatten(1, (slots, t))[row.to(logits.device), slot.to(logits.device)]

    def _rows(self, rows: slice | Sequence[int] | None) -> list[int]:
        rows = slice(None) if rows is None else rows
        rows = list(range(len(self.texts))[rows] if isinstance(rows, slice) else rows)
        if not rows:
            raise ValueError("needs at least one row")
        return rows

    def _embeddings(self, model, batch: dict[str, torch.Tensor], rows: list[int]) -> torch.Tensor:
        """Token embeddings of `batch`, each image placeholder holding its image's features (the
        vision tower once per distinct prompt of `rows`, which are `batch`'s rows in order). A sampled
        `<|image_pad|>` in a completion has token type 0 and stays an ordinary token."""
        embeds = model.get_input_embeddings()(batch["input_ids"])
        if "image_grid_thw" not in batch:
            return embeds
        placeholders = (batch["mm_token_type_ids"] == 1)[..., None]
        return embeds.masked_scatter(placeholders, self._image_features(model, rows).to(embeds.dtype))

    def _image_features(self, model, rows: list[int]) -> torch.Tensor:
        """Each distinct prompt's images encoded once, repeated for every row of that prompt."""
        prompts = sorted({r // self.group_size for r in rows})
        prompts = [p for p in prompts if "pixel_values" in self.prompt_inputs[p]]
        pixels = torch.cat([self.prompt_inputs[p]["pixel_values"] for p in prompts]).to(model.device)
        grids = torch.cat([self.prompt_inputs[p]["image_grid_thw"] for p in prompts]).to(model.device)
        features = iter(model.get_image_features(pixels, grids).pooler_output)
        per_prompt = {
            p: torch.cat([next(features) for _ in self.prompt_inputs[p]["image_grid_thw"]]) for p in prompts
        }
        return torch.cat(
            [per_prompt[r // self.group_size] for r in rows if r // self.group_size in per_prompt]
        )


class RolloutEngine(abc.ABC):
    """Samples groups of responses; the trainer sees only these three methods."""

    @abc.abstractmethod
    def generate(
        self,
        samples: list[Sample],
        prompts: list[str],
        sampling: SamplingParams,
        system_prompt: str | None = SYSTEM_PROMPT,
        *,
        logprobs: bool = False,
        max_prompt_tokens: int | None = None,
    ) -> RolloutBatch:
        """A group of `sampling.n` responses to each `prompts[i]` (the user text for `samples[i]`),
        sampled with exactly `sampling`, whatever the checkpoint's generation config says.

        `sampling.seed` makes a rollout reproducible without touching the trainer's global RNG; None
        draws a seed from the global RNG, which then advances, so a seeded run still reproduces.
        `logprobs` keeps each sampled token's log-prob under the raw (untempered) model distribution;
        it holds T x N x vocab logits while generating, so it is meant for checks and small runs (the
        update recomputes them). A prompt longer than `max_prompt_tokens` (images included) is
        refused, naming its sample."""

    @abc.abstractmethod
    def update_weights(self, model, version: int) -> None:
        """Make the next `generate` sample from `model`'s current weights. `version` counts the
        optimizer steps behind them; a version the engine already holds is skipped."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the engine holds (processes, GPU memory)."""


class TransformersRollout(RolloutEngine):
    """Samples with the trainer's own policy object through one `generate` call for all P * G rows.

    With `share_prefill` (the default), each prompt is prefilled once, vision tower included: the P
    prompts, less their last token, run through the model, the KV cache is repeated G-fold on the
    batch axis, and `generate` continues all P * G rows from the last prompt token. This gives the
    same tokens as processing every prompt G times (`share_prefill=False`, kept as the reference):
    each row draws from its own stream (`KeyedSampler`), keyed to its sample and its index in the
    group, and with fp32 the logits agree to rounding. The caller puts the model in eval mode (no gradient checkpointing, so the
    cache exists) around `generate`; sampling runs under `no_grad`, not `inference_mode`, so the
    returned tensors can enter the update's autograd graph.
    """

    def __init__(self, model, processor, share_prefill: bool = True, synced_gpus: bool = False):
        self.model = model
        self.processor = processor
        self.share_prefill = share_prefill
        # ZeRO-3 with several ranks: every rank must run every decoding step (each forward gathers
        # weights from all ranks), even after its own rows have finished.
        self.synced_gpus = synced_gpus
        tokenizer = tokenizer_of(processor)
        self.eos_ids = end_of_turn_ids(tokenizer, model.generation_config.eos_token_id)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def update_weights(self, model, version: int) -> None:
        """Nothing to do: this engine samples with the very model object the trainer updates."""

    def close(self) -> None:
        """Nothing to release: the model and processor belong to the trainer."""

    def generate(
        self,
        samples: list[Sample],
        prompts: list[str],
        sampling: SamplingParams,
        system_prompt: str | None = SYSTEM_PROMPT,
        *,
        logprobs: bool = False,
        max_prompt_tokens: int | None = None,
    ) -> RolloutBatch:
        check_prompts(samples, prompts)
        if self.model.training:
            raise RuntimeError("put the policy in eval mode for rollouts (model.eval()), then back to train")
        started = time.perf_counter()
        pairs = zip(samples, prompts, strict=True)
        inputs = [process_prompt(self.processor, s, p, system_prompt) for s, p in pairs]
        check_prompt_lengths(samples, inputs, max_prompt_tokens)
        processed = time.perf_counter()
        seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()))
        config = to_generation_config(
            sampling, self.eos_ids, self.pad_id, return_dict_in_generate=True, output_logits=logprobs
        )
        processors = []
        if not sampling.greedy:
            seeds = [keyed_seed(seed, s.id, k) for s in samples for k in range(sampling.n)]
            processors.append(KeyedSampler(sampling, seeds, self.model.device))
            for name in ("temperature", "top_p", "top_k"):  # applied by KeyedSampler, not twice
                setattr(config, name, None)
            config.do_sample = False
        with torch.no_grad():
            run = self._generate_shared if self.share_prefill else self._generate_repeated
            output, prompt_width = run(inputs, sampling.n, config, processors)
        timing = {"prepare": processed - started, "generate": time.perf_counter() - processed}
        return self._batch(samples, inputs, sampling.n, output, prompt_width, timing)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`batch` on the model's device, less the image-token types a text-only model does not take."""
        keep = takes_images(self.processor)
        return {k: v.to(self.model.device) for k, v in batch.items() if keep or k != "mm_token_type_ids"}

    def _generate_repeated(self, inputs: list[dict], group_size: int, config: GenerationConfig, processors):
        """Reference path: every prompt G times in the batch (vision tower and prefill run G times)."""
        batch = self._to_device(_collate([p for p in inputs for _ in range(group_size)], self.pad_id))
        output = self.model.generate(
            **batch, generation_config=config, logits_processor=processors, synced_gpus=self.synced_gpus
        )
        return output, batch["input_ids"].shape[1]

    def _generate_shared(self, inputs: list[dict], group_size: int, config: GenerationConfig, processors):
        """Prefill the P prompts once, less their last token, then continue G-fold from the cache.

        `generate` needs at least one uncached token to produce the first logits, hence the held-back
        last token (always text: the newline after "assistant").
        """
        batch = self._to_device(_collate(inputs, self.pad_id))
        positions = position_ids(self.model, batch)
        keys = [k for k in _PADDED_KEYS if k in batch]
        head = {k: batch[k][:, :-1] for k in keys}
        images = {k: batch[k] for k in _IMAGE_KEYS if k in batch}
        cache = self.model(
            **head, **images, position_ids=positions[..., :-1], use_cache=True, logits_to_keep=1
        ).past_key_values
        cache.batch_repeat_interleave(group_size)
        output = self.model.generate(
            **{k: batch[k].repeat_interleave(group_size, 0) for k in keys},
            position_ids=positions.repeat_interleave(group_size, 1),
            past_key_values=cache,
            generation_config=config,
            logits_processor=processors,
            synced_gpus=self.synced_gpus,
        )
        return output, batch["input_ids"].shape[1]

    def _batch(self, samples, inputs, group_size, output, prompt_width, timing) -> RolloutBatch:
        new = output.sequences[:, prompt_width:].cpu()
        is_eos = torch.isin(new, torch.tensor(self.eos_ids))
        stopped = is_eos.any(1)
        lengths = torch.where(stopped, is_eos.int().argmax(1) + 1, new.shape[1])
        mask = (torch.arange(new.shape[1])[None] < lengths[:, None]).long()
        ids = new.masked_fill(mask == 0, self.pad_id)
        logprobs = None
        if output.logits is not None:
            logits = torch.stack(output.logits, 1).float().cpu()
            logprobs = logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1) * mask
        texts = tokenizer_of(self.processor).batch_decode(
            [row[:n] for row, n in zip(ids, lengths.tolist(), strict=True)], skip_special_tokens=True
        )
        return RolloutBatch(
            samples=list(samples),
            prompt_inputs=inputs,
            group_size=group_size,
            completion_ids=ids,
            completion_mask=mask,
            texts=texts,
            finish_reasons=["stop" if s else "length" for s in stopped.tolist()],
            pad_id=self.pad_id,
            timing=timing,
            logprobs=logprobs,
        )
