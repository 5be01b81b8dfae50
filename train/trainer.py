"""The Observe-R1 GRPO loop on DeepSpeed: rollout -> rewards -> weighted advantages -> PPO-clip updates.

One step (docs/algorithms.md, "Training hyperparameters"): `rollout.prompts_per_step` prompts, split
evenly over the ranks, each answered `group_size` times by the current policy; rewards and
group advantages are computed per rank (a group never spans ranks); then `algorithm.ppo_epochs`
passes of optimizer updates of `optim.train_batch` responses (all ranks), each made of
micro-batches of `optim.micro_batch` responses that DeepSpeed accumulates.

Several ranks compute what one rank computes from the same seed and data (tests/test_train_run.py):
the rollout seed is keyed to the step's place in the data stream, not to the rank, and each response's
randomness to its sample (train/rollout.py); the prompts are dealt to the ranks so that every
optimizer update holds the responses it holds on one rank (`rank_block`); and each micro-batch's loss
is scaled to its share of the update's global mean (`algorithms.global_batch_scale`), so the
token-mean is taken over the whole update, not per rank.

Micro-batches take responses in group order, not shuffled: the responses of a prompt that fall
in one micro-batch then share one pass of its prompt, vision tower and language model alike
(`optim.shared_prefix`, train/shared_prefix.py; with it off, only the vision tower is shared), which
is most of the saving over a per-completion pipeline. The prompt is computed once per micro-batch,
not kept across a group's micro-batches: each micro-batch's forward and backward then stand alone,
as DeepSpeed's accumulation, ZeRO-3's gathering of weights per forward and gradient checkpointing
expect, and an optimizer step between two micro-batches of a group changes nothing. With
`optim.micro_batch` a multiple of `rollout.group_size`, that is once per group. The math lives in
train/algorithms.py and train/rewards.py; this module only moves tensors between them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from observe_r1.config import ConfigError
from observe_r1.data import Sample
from observe_r1.errors import InvalidValue
from observe_r1.sampling import SamplingParams
from observe_r1_train import algorithms, dynamic_sampling
from observe_r1_train import shared_prefix as sharing
from observe_r1_train.config import TrainConfig
from observe_r1_train.prompts import prompt_text
from observe_r1_train.rewards import RewardBreakdown, compute_rewards
from observe_r1_train.rollout import RolloutBatch, RolloutEngine, TransformersRollout, keyed_seed
from observe_r1_train.runner import Runner, StepResult, reference_model

log = logging.getLogger(__name__)


def rollout_engine(setting: str) -> str:
    """`rollout.engine` resolved: auto is vllm where CUDA and vLLM are both present, else transformers."""
    if setting != "auto":
        return setting
    import importlib.util

    return "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "transformers"


def pooled_std(count: float, total: float, squares: float) -> float:
    """The sample standard deviation of values known by their count, sum and sum of squares, each summed
    over the ranks: sqrt((Σx² - (Σx)²/n) / (n - 1)); a mean of per-rank deviations would miss the
    spread between ranks. 0 for fewer than two values."""
    if count < 2:
        return 0.0
    return math.sqrt(max(squares - total * total / count, 0.0) / (count - 1))


class GRPOTrainer(Runner):
    """Observe-R1 GRPO from a `TrainConfig`; `train()` runs or resumes the run."""

    name = "GRPO"
    postfix_keys = ("reward/total", "accuracy", "format_rate")

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        super().__init__(cfg, progress)
        alg = cfg.algorithm
        self.ref = None
        if alg.needs_ref_model:
            self.ref = reference_model(
                cfg.model.ref_path or cfg.model.path,
                cfg.model.dtype,
                cfg.deepspeed.zero_stage,
                self.ds_config,
                self.device,
            )
        self.shared_prefix = self._install_shared_prefix(cfg.optim.shared_prefix)
        self.rollout = self._rollout_engine(rollout_engine(cfg.rollout.engine))

    def _rollout_engine(self, kind: str) -> RolloutEngine:
        cfg, ro = self.cfg, self.cfg.rollout
        zero3 = cfg.deepspeed.zero_stage == 3
        if kind == "transformers":
            return TransformersRollout(
                self.engine.module, self.processor, synced_gpus=zero3 and self.world > 1
            )
        from observe_r1_train.vllm_rollout import VLLMRollout

        return VLLMRollout(
            cfg.model.path,
            self.processor,
            ro.vllm,
            dtype=cfg.model.dtype,
            max_model_len=ro.max_prompt_tokens + ro.max_new_tokens,
            seed=cfg.seed,
            world=self.world,
            zero3=zero3,
        )

    def train(self):
        try:
            return super().train()
        finally:
            self.rollout.close()

    def _install_shared_prefix(self, setting: bool | None) -> bool:
        """Whether the update shares each micro-batch's prompts (`optim.shared_prefix`), installing
        the split attention on the policy and the reference model when it does."""
        if setting is False:
            return False
        models = [m for m in (self.engine.module, self.ref) if m is not None]
        reason = next((r for r in map(sharing.inexact_reason, models) if r is not None), None)
        if reason is not None:
            if setting:
                raise ConfigError(
                    f"optim.shared_prefix: the shared-prefix update is not exact here: {reason}"
                )
            log.info("optim.shared_prefix: off, %s", reason)
            return False
        for model in models:
            sharing.install(model)
        return True

    def stream_batch(self) -> int:
        return self.cfg.rollout.prompts_per_step

    def rank_block(self) -> int:
        """Prompts per rank per optimizer update when an update's responses split into whole groups on
        every rank: the ranks then take turns by update, so an update holds the same responses as on
        one rank. Otherwise each rank takes one contiguous share."""
        per_update = self.cfg.optim.train_batch
        g = self.cfg.rollout.group_size
        if per_update % (g * self.world) == 0:
            return per_update // (g * self.world)
        return super().rank_block()

    def trained_sampling(self) -> SamplingParams:
        return self.cfg.rollout.sampling()

    def updates_per_step(self) -> int:
        responses = self.cfg.rollout.prompts_per_step * self.cfg.rollout.group_size
        return responses // self.cfg.optim.train_batch * self.cfg.algorithm.ppo_epochs

    def _rollout(self, samples: list[Sample], seed: int) -> RolloutBatch:
        hints = self.cfg.hints
        prompts = [prompt_text(s, hints.enabled, hints.position) for s in samples]
        ro = self.cfg.rollout
        self.rollout.update_weights(self.engine.module, self.engine.global_steps)
        self.engine.module.eval()
        try:
            return self.rollout.generate(
                samples,
                prompts,
                ro.sampling(seed),
                self.system_prompt,
                max_prompt_tokens=ro.max_prompt_tokens,
            )
        finally:
            self.engine.module.train()

    def _logprobs(self, model, batch: RolloutBatch, rows: list[int], with_entropy: bool = False):
        """Log-probs (n, T) of the sampled completion tokens of `rows` under `model`, and optionally
        the mean token entropy of its distribution there."""
        logits = batch.completion_logits(model, rows, shared_prefix=self.shared_prefix)
        ids = batch.completion_ids[rows].to(logits.device)
        logprobs = algorithms.token_logprobs(logits, ids, self.cfg.rollout.temperature)
        if not with_entropy:
            return logprobs, None
        with torch.no_grad():
            mask = batch.completion_mask[rows].to(logits.device)
            entropy = algorithms.entropy_from_logits(logits.detach() / self.cfg.rollout.temperature, mask)
        return logprobs, entropy

    @torch.no_grad()
    def _score(self, model, batch: RolloutBatch) -> torch.Tensor:
        """Log-probs of every response under `model`, without gradients, micro-batch by micro-batch."""
        return torch.cat(
            [self._logprobs(model, batch, rows)[0] for rows in self.micro_batches(len(batch.texts))]
        )

    def _advantages(self, rewards: torch.Tensor, accuracy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Group advantages times the per-group weight (Observe-R1 4σd(1-d), difficulty prior)."""
        alg, g = self.cfg.algorithm, self.cfg.rollout.group_size
        adv = algorithms.group_advantages(rewards, g, alg.normalize_std, alg.unbiased_std, alg.adv_eps)
        p = algorithms.group_accuracy(accuracy, g)
        observe_w = (
            algorithms.observe_r1_weight(p, alg.weight_sigma) if alg.observe_weight else torch.ones_like(p)
        )
        prior = alg.difficulty_prior
        prior_w = algorithms.DIFFICULTY_WEIGHTS[prior.kind](p, **prior.weight_kwargs())
        weights = algorithms.combine_weights(observe_w, prior_w, prior.combine)
        return algorithms.apply_group_weights(adv, weights, g), weights

    def _update(self, batch: RolloutBatch, adv: torch.Tensor, old_lp, ref_lp) -> dict[str, float]:
        """PPO-clip updates over the step's responses; returns the means of the per-micro-batch stats."""
        alg, model = self.cfg.algorithm, self.engine.module
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}

        def add(key: str, value) -> None:
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1

        micro = self.micro_batches(len(batch.texts))
        units = [float(algorithms.aggregation_units(batch.completion_mask[rows], alg.agg)) for rows in micro]
        gas = self.grad_accumulation
        update_units = self.sum_over_ranks([sum(units[i : i + gas]) for i in range(0, len(micro), gas)])
        scales = [
            algorithms.global_batch_scale(u, update_units[i // gas], gas * self.world)
            for i, u in enumerate(units)
        ]
        for _ in range(alg.ppo_epochs):
            for rows, scale in zip(micro, scales, strict=True):
                logprobs, entropy = self._logprobs(model, batch, rows, with_entropy=True)
                mask = batch.completion_mask[rows].to(logprobs.device)
                old = logprobs.detach() if old_lp is None else old_lp[rows].to(logprobs.device)
                loss, stats = algorithms.policy_loss(
                    logprobs,
                    old,
                    adv[rows].to(logprobs.device),
                    mask,
                    alg.clip_low,
                    alg.clip_high,
                    alg.agg,
                    self.cfg.rollout.max_new_tokens,
                )
                if ref_lp is not None:
                    ref = ref_lp[rows].to(logprobs.device)
                    add(
                        "kl",
                        algorithms.masked_mean(
                            algorithms.kl_penalty(logprobs.detach(), ref, alg.kl_kind), mask
                        ),
                    )
                    if alg.kl_mode == "loss":
                        loss = loss + algorithms.kl_loss(
                            logprobs,
                            ref,
                            mask,
                            alg.kl_coef,
                            alg.kl_kind,
                            alg.agg,
                            self.cfg.rollout.max_new_tokens,
                        )
                loss = loss * scale
                norm = self.backward_step(loss)
                add("loss", loss.detach())
                add("entropy", entropy)
                for key in ("clip_ratio", "approx_kl"):
                    add(key, stats[key])
                if norm is not None:
                    add("grad_norm", norm)
        return {k: sums[k] / counts[k] for k in sums}

    def _generate_round(self, timing: dict[str, float]) -> tuple[RolloutBatch, RewardBreakdown]:
        """One generation round: the stream's next prompts (this rank's share), sampled and scored,
        adding the seconds spent to `timing`. The rollout seed is keyed to the round's place in the
        data stream, so every rank, and a resumed run, draws the same responses for the same prompts."""
        started = time.perf_counter()
        cfg, g, rw = self.cfg, self.cfg.rollout.group_size, self.cfg.reward
        place = self.stream.state_dict()
        samples = self._rank_slice(self.stream.next_batch())
        batch = self._rollout(samples, keyed_seed(cfg.seed, "rollout", place["epoch"], place["index"]))
        rolled = time.perf_counter()
        breakdown = compute_rewards(
            batch.texts,
            [s for s in samples for _ in range(g)],
            batch.completion_lengths.tolist(),
            g,
            rw.components,
            format_variant=cfg.format.variant,
            nested_observe=rw.nested_observe,
            bonus_coef=rw.bonus_coef,
            bonus_min_len=rw.bonus_min_len,
            bonus_requires_format=rw.bonus_requires_format,
            clamp=rw.clamp,
            shuffle=rw.shuffle,
            shuffle_seed=keyed_seed(cfg.seed, "shuffle", place["epoch"], place["index"]),
        )
        timing["rollout"] += rolled - started
        timing["reward"] += time.perf_counter() - rolled
        return batch, breakdown

    def _collect(self) -> Collected:
        """This rank's groups for the step: one round, or with `rollout.filter` on, rounds until every
        rank holds its share of kept groups (a rank's surplus is dropped, as in DAPO)."""
        cfg, g, filt = self.cfg, self.cfg.rollout.group_size, self.cfg.rollout.filter
        quota = cfg.rollout.prompts_per_step // self.world
        kept: list[tuple[RolloutBatch, RewardBreakdown, list[int]]] = []
        generated: list[RewardBreakdown] = []
        logged: list[dict] = []
        have = passed = 0
        timing = {"rollout": 0.0, "reward": 0.0}
        while True:
            batch, breakdown = self._generate_round(timing)
            generated.append(breakdown)
            keep = list(range(len(batch.samples)))
            if filt.enabled:
                mask = algorithms.group_filter(
                    torch.tensor(breakdown.total),
                    torch.tensor(breakdown.accuracy),
                    g,
                    filt.drop_zero_variance,
                    filt.min_accuracy,
                    filt.max_accuracy,
                )
                keep = mask.nonzero().flatten().tolist()
            passed += len(keep)
            keep = keep[: quota - have]
            have += len(keep)
            kept.append((batch, breakdown, keep))
            logged += [
                {"id": s.id, "kept": i in keep, **_group_log(batch, breakdown, i)}
                for i, s in enumerate(batch.samples)
            ]
            short = self.sum_over_ranks([quota - have])[0] if filt.enabled else 0
            if short == 0:
                break
            if len(generated) == filt.max_rounds:
                raise InvalidValue(
                    f"rollout.filter: {int(short)} of the step's {cfg.rollout.prompts_per_step} groups still"
                    f" missing after {len(generated)} generation rounds (rollout.filter.max_rounds); most"
                    " groups carry no learning signal (equal rewards, or accuracy outside"
                    " rollout.filter.min_accuracy..max_accuracy). Raise rollout.filter.max_rounds, widen the"
                    " accuracy range, or train on data of a better-matched difficulty"
                )
        rewards = [b.total[i * g + k] for _, b, keep in kept for i in keep for k in range(g)]
        accuracy = [b.accuracy[i * g + k] for _, b, keep in kept for i in keep for k in range(g)]
        return Collected(
            batch=dynamic_sampling.concat_batches(
                [dynamic_sampling.select_groups(batch, keep) for batch, _, keep in kept]
            ),
            rewards=torch.tensor(rewards),
            accuracy=torch.tensor(accuracy),
            reward_metrics={
                k: sum(b.metrics[k] for b in generated) / len(generated) for k in generated[0].metrics
            },
            filter_metrics=(
                {"filter/rounds": len(generated), "filter/kept_share": passed / (len(generated) * quota)}
                if filt.enabled
                else {}
            ),
            timing=timing,
            logged=logged,
        )

    def step(self) -> StepResult:
        """One step: rollout (and online filtering), rewards, weighted advantages and the updates;
        metrics are averaged over ranks, the reward metrics over every response generated."""
        cfg, g = self.cfg, self.cfg.rollout.group_size
        started = time.perf_counter()
        collected = self._collect()
        batch, rewards = collected.batch, collected.rewards
        scored = time.perf_counter()
        lengths = batch.completion_lengths
        alg = cfg.algorithm
        off_policy = self.updates_per_step() > 1
        old_lp = self._score(self.engine.module, batch) if off_policy else None
        ref_lp = self._score(self.ref, batch) if self.ref is not None else None
        if ref_lp is not None and alg.kl_mode == "reward":
            policy_lp = old_lp if old_lp is not None else self._score(self.engine.module, batch)
            kl = algorithms.kl_penalty(policy_lp, ref_lp, alg.kl_kind)
            rewards = algorithms.kl_in_reward(rewards, kl, batch.completion_mask, alg.kl_coef)
        adv, weights = self._advantages(rewards, collected.accuracy)
        update = self._update(batch, adv, old_lp, ref_lp)
        done = time.perf_counter()

        metrics = {
            **collected.reward_metrics,
            **collected.filter_metrics,
            **update,
            "weight/mean": weights.mean().item(),
            "weight/zero_share": (weights == 0).float().mean().item(),
            "advantage/mean": adv.mean().item(),
            "response_length/mean": lengths.float().mean().item(),
            "response_length/clipped_share": sum(r == "length" for r in batch.finish_reasons) / len(lengths),
            "time/rollout_s": collected.timing["rollout"],
            "time/reward_s": collected.timing["reward"],
            "time/update_s": done - scored,
        }
        metrics = self.mean_over_ranks(metrics)
        metrics |= self.max_over_ranks(
            {"advantage/abs_max": adv.abs().max().item(), "response_length/max": lengths.max().item()}
        )
        metrics["advantage/std"] = pooled_std(
            *self.sum_over_ranks([adv.numel(), adv.sum().item(), adv.double().square().sum().item()])
        )
        metrics["lr"] = self.engine.get_lr()[0]
        metrics["time/step_s"] = time.perf_counter() - started
        advantages = iter(adv.view(-1, g).tolist())
        for row in collected.logged:
            row["advantages"] = [round(a, 4) for a in next(advantages)] if row["kept"] else None
            if not cfg.rollout.filter.enabled:
                del row["kept"]
        return StepResult(metrics, self.gather(collected.logged))


@dataclass
class Collected:
    """A step's groups on one rank, ready for the update (`GRPOTrainer._collect`)."""

    batch: RolloutBatch  # the kept groups, in round order
    rewards: torch.Tensor  # (N,) their total rewards
    accuracy: torch.Tensor  # (N,) their 0/1 answer checks
    reward_metrics: dict[str, float]  # over every response generated, kept or not
    filter_metrics: dict[str, float]  # rounds and the share of generated groups that passed the filter
    timing: dict[str, float]  # seconds spent generating and scoring
    logged: list[dict]  # one row per generated group for rollouts.jsonl


def _group_log(batch: RolloutBatch, breakdown: RewardBreakdown, i: int) -> dict:
    """What rollouts.jsonl shows of group `i`: its rewards, its first response and the gold answer."""
    g = batch.group_size
    return {
        "rewards": [round(r, 4) for r in breakdown.total[i * g : (i + 1) * g]],
        "response": batch.texts[i * g],
        "answer": batch.samples[i].answer,
    }
