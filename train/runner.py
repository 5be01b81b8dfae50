"""The run shared by GRPO and the SFT warm start: set-up, the step loop, checkpoints, export, curves.

A subclass says how many samples one step reads (`stream_batch`), how many optimizer updates a
step makes (`updates_per_step`, for the LR schedule) and what a step does (`step`); everything a
user relies on across both (resume, atomic checkpoints, SIGTERM, progress bar, JSONL and
TensorBoard metrics, the PNG, the Hugging Face export) lives here once.
"""

from __future__ import annotations

import abc
import logging
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from observe_r1.config import ConfigError, save_config
from observe_r1.data import Sample, load_samples
from observe_r1.errors import InvalidValue
from observe_r1.format import system_prompt
from observe_r1.modeling import load_model, load_processor
from observe_r1.sampling import SamplingParams
from observe_r1_train import checkpoint
from observe_r1_train.config import RunConfig, grad_accumulation
from observe_r1_train.engine import (
    deepspeed_config,
    device_for_rank,
    init_distributed,
    initialize,
    make_optimizer,
    make_scheduler,
)
from observe_r1_train.prompts import DataExhausted, PromptStream
from observe_r1_train.tracking import CURVES_FILE, METRICS_FILE, Tracker, plot_curves

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_share(batch: list, rank: int, world: int, block: int) -> list:
    """`rank`'s share of `batch`: blocks of `block` consecutive items dealt to the ranks in turn
    (block 0 to rank 0, block 1 to rank 1, ..., block `world` to rank 0 again)."""
    if block <= 0 or len(batch) % (block * world):
        raise ValueError(f"{len(batch)} items do not deal into blocks of {block} over {world} ranks")
    return [x for i in range(rank * block, len(batch), block * world) for x in batch[i : i + block]]


def load_training_samples(paths: list[Path], max_samples: int | None) -> list[Sample]:
    """Every file's rows in the order given, cut to the first `max_samples` (the paper: 20,000)."""
    samples = [s for path in paths for s in load_samples(path)]
    return samples[:max_samples] if max_samples else samples


def prepare_model(path: str, gradient_checkpointing: bool, freeze_vision_tower: bool):
    """The policy as loaded for training (an image-text-to-text model, or a text-only causal LM such as
    the tiny Qwen2 the vLLM rollout tests train): fp32 weights (DeepSpeed casts to bf16 itself), optional
    gradient checkpointing (non-reentrant, so frozen inputs still get gradients), optional frozen
    vision tower."""
    model = load_model(path, dtype="fp32", allow_text_only=True)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if freeze_vision_tower:
        if not hasattr(model.model, "visual"):
            raise ConfigError(
                f"model.freeze_vision_tower: {path} is a text-only model, it has no vision tower"
            )
        model.model.visual.requires_grad_(False)
    model.config.use_cache = False
    return model


@dataclass
class StepResult:
    metrics: dict[str, float]
    rollouts: list[dict]  # rows for rollouts.jsonl (all ranks); may be empty


class Runner(abc.ABC):
    """Builds the DeepSpeed engine from a validated config (TrainConfig or SFTConfig, both a
    RunConfig), resumes, and runs `train()`."""

    name = "run"
    postfix_keys: tuple[str, ...] = ()

    @abc.abstractmethod
    def stream_batch(self) -> int:
        """Samples one step reads, all ranks together (a multiple of the world size)."""

    @abc.abstractmethod
    def updates_per_step(self) -> int:
        """Optimizer updates one step makes."""

    @abc.abstractmethod
    def step(self) -> StepResult:
        """One step: read `stream_batch` samples (this rank's share), update, return the metrics."""

    def trained_sampling(self) -> SamplingParams:
        """The sampling the model was trained with, which its export states as its generation config
        (neutral sampling unless the run sampled otherwise)."""
        return SamplingParams()

    def __init__(self, cfg: RunConfig, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.rank, self.world = init_distributed()
        batch = self.stream_batch()
        if batch % self.world:
            raise ConfigError(f"{self.name}: a step's {batch} samples do not split over {self.world} ranks")
        self.device = device_for_rank()
        seed_everything(cfg.seed + self.rank)
        self.output_dir = Path(cfg.checkpoint.output_dir)
        self.system_prompt = system_prompt(cfg.format.variant, cfg.data.system_prompt)

        samples = load_training_samples(cfg.data.paths, cfg.data.max_samples)
        self.stream = PromptStream(samples, batch, cfg.optim.epochs, cfg.data.shuffle, cfg.seed)
        self.total_steps = min(cfg.max_steps or self.stream.total_steps, self.stream.total_steps)
        if cfg.max_steps and cfg.max_steps > self.stream.total_steps:
            log.warning(
                "max_steps %d is more than the data gives (%d steps of %d samples); stopping at %d",
                cfg.max_steps,
                self.stream.total_steps,
                batch,
                self.total_steps,
            )

        self.processor = load_processor(cfg.model.path, allow_text_only=True)
        model = prepare_model(cfg.model.path, cfg.model.gradient_checkpointing, cfg.model.freeze_vision_tower)
        opt, ds = cfg.optim, cfg.deepspeed
        self.grad_accumulation = grad_accumulation(cfg, self.world)
        self.ds_config = deepspeed_config(
            train_batch=opt.train_batch,
            micro_batch=opt.micro_batch,
            grad_accumulation=self.grad_accumulation,
            zero_stage=ds.zero_stage,
            bf16=cfg.model.dtype == "bf16",
            grad_clip=opt.grad_clip,
            offload=ds.offload,
            extra=ds.extra,
        )
        optimizer = make_optimizer(
            model.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay, offload=ds.offload
        )
        scheduler = make_scheduler(
            optimizer,
            total_steps=self.total_steps * self.updates_per_step(),
            warmup_ratio=opt.warmup_ratio,
            min_lr_ratio=opt.min_lr_ratio,
        )
        self.engine = initialize(model, self.ds_config, optimizer, scheduler)
        self.start_step = 0
        self.elapsed_s = 0.0  # training seconds before this start (from the checkpoint)
        self._stop_requested = False

    def rank_block(self) -> int:
        """Consecutive samples of a step's batch that go to one rank together (`rank_share`); by
        default each rank takes one contiguous share."""
        return self.stream_batch() // self.world

    def _rank_slice(self, batch: list[Sample]) -> list[Sample]:
        return rank_share(batch, self.rank, self.world, self.rank_block())

    def _resume(self) -> int:
        """Restore the latest (or the named) checkpoint; returns the step to continue after."""
        resume = self.cfg.checkpoint.resume
        checkpoint.remove_partial(self.output_dir)
        if resume == "none":
            if checkpoint.list_checkpoints(self.output_dir):
                raise ConfigError(
                    f"checkpoint.resume=none but {self.output_dir} already holds checkpoints;"
                    " resume with checkpoint.resume=auto or pick a new checkpoint.output_dir"
                )
            return 0
        path = checkpoint.latest_checkpoint(self.output_dir) if resume == "auto" else Path(resume)
        if path is None:
            return 0
        state = checkpoint.load(self.engine, path)
        self.stream.load_state_dict(state["stream"])
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        log.info("resumed from %s (step %d)", path, state["step"])
        return int(state["step"])

    def micro_batches(self, n: int) -> list[list[int]]:
        """The row indices of `n` rows in slices of `optim.micro_batch`."""
        size = self.cfg.optim.micro_batch
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]

    def backward_step(self, loss: torch.Tensor) -> float | None:
        """One micro-batch's backward and step (DeepSpeed accumulates, and steps the optimizer at the
        accumulation boundary); the global gradient norm when this micro-batch closed one, else None."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self._start_micro_batch()
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm() if boundary else None
        return None if norm is None else float(norm)

    def _start_micro_batch(self) -> None:
        """Tell ZeRO that a new micro-batch's backward follows, as `engine.forward` would.

        ZeRO-3 adds a backward's gradients to the accumulated ones only once its micro-step counter
        has moved past the first micro-batch, and DeepSpeed moves it in `engine.forward`. Our forwards
        call the module itself (the vision tower and the embeddings run outside the language model's
        forward), so without this every micro-batch of an accumulation overwrote the gradient of the
        one before: a ZeRO-3 update with accumulation trained on its last micro-batch alone. The call
        is idempotent until the next backward, so a forward through the engine as well is harmless.
        """
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        if isinstance(self.engine.optimizer, ZeROOptimizer):
            self.engine.optimizer.clear_backward_seen_flag()

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        """Each of `values` summed over the ranks (every rank must call this, in the same order)."""
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def max_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric's largest value over the ranks (every rank must call this, in the same order)."""
        keys = sorted(metrics)
        if self.world == 1:
            return {k: float(metrics[k]) for k in keys}
        import torch.distributed as dist

        top = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        return dict(zip(keys, top.tolist(), strict=True))

    def mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        keys = sorted(metrics)
        totals = self.sum_over_ranks([float(metrics[k]) for k in keys])
        return {k: v / self.world for k, v in zip(keys, totals, strict=True)}

    def gather(self, rows: list[dict]) -> list[dict]:
        if self.world == 1:
            return rows
        import torch.distributed as dist

        parts: list = [None] * self.world
        dist.all_gather_object(parts, rows)
        return [row for part in parts for row in part]

    def _request_stop(self, signum, frame) -> None:
        """SIGTERM (a pre-empted pod, Ctrl-C on the launcher): finish this step, checkpoint, exit."""
        log.warning("signal %d: stopping after this step with a checkpoint", signum)
        self._stop_requested = True

    def _time_up(self, elapsed_s: float) -> bool:
        """Whether `max_time_s` is spent on any rank (every rank calls this after each step, so they
        all stop after the same step)."""
        budget = self.cfg.max_time_s
        if budget is None:
            return False
        return self.sum_over_ranks([float(elapsed_s >= budget)])[0] > 0

    def _save(self, step: int, elapsed_s: float) -> None:
        checkpoint.save(
            self.engine,
            self.output_dir,
            step,
            {"stream": self.stream.state_dict(), "elapsed_s": elapsed_s},
            self.cfg.checkpoint.keep_last,
        )

    def train(self) -> dict[str, Any]:
        """Run steps `start_step + 1 .. total_steps` with checkpoints, then export and plot.

        A run whose `max_time_s` is spent stops after the step under way and ends as at `total_steps`:
        a checkpoint, the export, the curves. SIGTERM only checkpoints (the run resumes later).
        Returns a summary: the step reached, the last checkpoint, the training seconds, whether the
        time budget stopped it, the export and curve paths."""
        cfg = self.cfg
        self.start_step = self._resume()
        tracker = Tracker(
            self.output_dir,
            enabled=self.rank == 0,
            jsonl=cfg.logging.jsonl,
            tensorboard=cfg.logging.tensorboard,
            start_step=self.start_step,
        )
        if self.rank == 0:
            save_config(cfg, self.output_dir / "config.yaml")
        previous = signal.signal(signal.SIGTERM, self._request_stop)
        bar = self._progress_bar()
        step = saved = self.start_step
        started, time_up = time.monotonic() - self.elapsed_s, self._time_up(self.elapsed_s)
        try:
            while step < self.total_steps and not self._stop_requested and not time_up:
                self._step_start = self.stream.state_dict()
                try:
                    result = self.step()
                except DataExhausted:
                    self._data_ran_out(step)
                    break
                step += 1
                elapsed = time.monotonic() - started
                time_up = self._time_up(elapsed)
                if time_up and step < self.total_steps:
                    log.warning(
                        "max_time_s=%s spent (%.0f s) after step %d: ending the run",
                        cfg.max_time_s,
                        elapsed,
                        step,
                    )
                if step % cfg.logging.log_every == 0:
                    tracker.log(step, result.metrics)
                    tracker.log_rollouts(step, result.rollouts)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        {k: f"{result.metrics[k]:.3f}" for k in self.postfix_keys if k in result.metrics}
                    )
                every = cfg.checkpoint.save_every
                if (
                    (every and step % every == 0)
                    or step == self.total_steps
                    or self._stop_requested
                    or time_up
                ):
                    self._save(step, elapsed)
                    saved = step
            if saved != step:  # the data ran out before the planned last step
                self._save(step, time.monotonic() - started)
                saved = step
        finally:
            signal.signal(signal.SIGTERM, previous)
            if bar is not None:
                bar.close()
            tracker.close()
        summary: dict[str, Any] = {
            "start_step": self.start_step,
            "step": step,
            "total_steps": self.total_steps,
            "checkpoint_step": saved,
            "elapsed_s": round(time.monotonic() - started, 1),
            "time_up": time_up and step < self.total_steps,
        }
        if (step == self.total_steps or time_up) and cfg.checkpoint.export_hf:
            summary["model"] = str(
                checkpoint.export_hf(
                    self.engine, self.processor, self.output_dir / "model", self.trained_sampling()
                )
            )
        if self.rank == 0 and cfg.logging.plot_png:
            png = plot_curves(self.output_dir / METRICS_FILE, self.output_dir / CURVES_FILE, title=self.name)
            summary["curves"] = str(png) if png else None
        return summary

    def _data_ran_out(self, step: int) -> None:
        """The data ran out inside step `step + 1` (a step that reads extra prompts, as online
        filtering does, can use up the data before the planned last step): that step is abandoned and
        the run ends at `step`, saved and exported as a finished run. The stream goes back to where
        the abandoned step began, so the checkpoint's position is that of step `step`'s end."""
        if step == 0:
            raise InvalidValue(
                f"the data ran out before the first step was filled: {len(self.stream.samples)} samples"
                " cannot supply one step's groups through online filtering (rollout.filter)"
            )
        log.warning(
            "the data ran out during step %d of the planned %d (online filtering reads extra prompts);"
            " ending the run at step %d",
            step + 1,
            self.total_steps,
            step,
        )
        self.stream.load_state_dict(self._step_start)
        self.total_steps = step

    def _progress_bar(self):
        if self.rank != 0 or not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.total_steps, initial=self.start_step, desc=self.name, unit="step", dynamic_ncols=True
        )


def reference_model(path: str, dtype: str, zero_stage: int, ds_config: dict, device: torch.device):
    """A frozen model for KL: partitioned like the policy under ZeRO-3, else a plain copy on `device`."""
    ref = load_model(path, dtype=dtype, allow_text_only=True).eval().requires_grad_(False)
    if zero_stage == 3:
        return initialize(ref, {**ds_config, "zero_optimization": {"stage": 3}}).module
    return ref.to(device)
