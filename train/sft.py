"""`observe-r1 sft`: a short supervised warm start on formatted answers, on the GRPO trainer's engine.

A random or untuned model almost never writes `<observe>…</observe><think>…</think><answer>…</answer>`,
so every GRPO group scores the same and the advantages vanish. A few SFT steps on well-formed
targets give the format reward something to work with. The target of a row is its own `response`
field when it has one (a full formatted answer), else `observe_r1.format.format_response` of its
`observation` and `reasoning` fields (or the config's defaults) and its gold answer, both in the
run's `format.variant`: with `think` an own response's observe block is left out
(`observe_r1.format.to_variant`), and so is the observation of a built target.

The loss is the token mean of -log p(target) over the response tokens (the prompt is not
trained), computed through the same `RolloutBatch.model_inputs` as the GRPO update, so images
are encoded the same way in both stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from observe_r1.config import load_config
from observe_r1.data import Sample
from observe_r1.format import DEFAULT_VARIANT, format_response, to_variant
from observe_r1.modeling import tokenizer_of
from observe_r1.sampling import END_OF_TURN
from observe_r1_train import algorithms
from observe_r1_train.config import RunConfig
from observe_r1_train.rollout import RolloutBatch, process_prompt
from observe_r1_train.runner import Runner, StepResult

DEFAULT_OBSERVATION = "I look at the image for what the question asks about."  # ours
DEFAULT_REASONING = "I check what I see against the question and give the answer."  # ours


@dataclass
class TargetConfig:
    """Where a row's SFT target comes from (row fields first, then these defaults)."""

    response_field: str = "response"
    observation_field: str = "observation"
    reasoning_field: str = "reasoning"
    default_observation: str = DEFAULT_OBSERVATION
    default_reasoning: str = DEFAULT_REASONING
    max_target_tokens: int = 1024


@dataclass
class SFTConfig(RunConfig):
    """The warm start: the shared run (set optim's lr and batch for SFT in the YAML) plus the targets."""

    target: TargetConfig = field(default_factory=TargetConfig)


def load_sft_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> SFTConfig:
    return load_config(SFTConfig, path, overrides)


def sft_target(sample: Sample, target: TargetConfig, variant: str = DEFAULT_VARIANT) -> str:
    """The response in `variant`'s format to imitate for `sample` (its own, or built from its fields)."""
    own = sample.extra.get(target.response_field)
    if isinstance(own, str) and own.strip():
        return to_variant(own, variant)
    observation = sample.extra.get(target.observation_field) or target.default_observation
    reasoning = sample.extra.get(target.reasoning_field) or target.default_reasoning
    return format_response(str(observation), str(reasoning), sample.answer, variant)


class SFTTrainer(Runner):
    """One step = one optimizer update of `optim.train_batch` samples (all ranks)."""

    name = "SFT"
    postfix_keys = ("loss", "token_accuracy")

    def stream_batch(self) -> int:
        return self.cfg.optim.train_batch

    def updates_per_step(self) -> int:
        return 1

    def _batch(self, samples: list[Sample]) -> RolloutBatch:
        """Prompts and tokenised targets (ending in the end-of-turn token) as a group-size-1 batch."""
        tokenizer = tokenizer_of(self.processor)
        limit = self.cfg.target.max_target_tokens
        prompts = [process_prompt(self.processor, s, s.question, self.system_prompt) for s in samples]
        texts = [sft_target(s, self.cfg.target, self.cfg.format.variant) for s in samples]
        targets = [tokenizer(text + END_OF_TURN).input_ids[:limit] for text in texts]
        width = max(len(t) for t in targets)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(samples), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, target in enumerate(targets):
            ids[row, : len(target)] = torch.tensor(target)
            mask[row, : len(target)] = 1
        return RolloutBatch(
            samples=samples,
            prompt_inputs=prompts,
            group_size=1,
            completion_ids=ids,
            completion_mask=mask,
            texts=texts,
            finish_reasons=["stop"] * len(samples),
            pad_id=pad,
            timing={},
        )

    def step(self) -> StepResult:
        samples = self._rank_slice(self.stream.next_batch())
        batch = self._batch(samples)
        model = self.engine.module
        losses, correct, norm = [], [], None
        for rows in self.micro_batches(len(samples)):
            logits = batch.completion_logits(model, rows)
            ids = batch.completion_ids[rows].to(logits.device)
            mask = batch.completion_mask[rows].to(logits.device)
            loss = -algorithms.masked_mean(algorithms.token_logprobs(logits, ids), mask)
            step_norm = self.backward_step(loss)
            norm = norm if step_norm is None else step_norm
            losses.append(loss.item())
            correct.append(algorithms.masked_mean((logits.argmax(-1) == ids).float(), mask).item())
        metrics = {"loss": sum(losses) / len(losses), "token_accuracy": sum(correct) / len(correct)}
        if norm is not None:
            metrics["grad_norm"] = norm
        metrics = self.mean_over_ranks(metrics)
        metrics["lr"] = self.engine.get_lr()[0]
        return StepResult(metrics, [])
