"""Which samples feed each training step, in which order, and the prompt text each one gets (its
question, and in stage 2 of the difficulty prior the difficulty hint its row carries).

The NeuraLadder is read in file order by default (the curriculum *is* the order); `shuffle`
permutes each epoch with a seed. The stream's position is part of every checkpoint, so a resumed
run continues with the next unseen sample: none skipped, none repeated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from observe_r1.data import Sample
from observe_r1.errors import InvalidValue


class DataExhausted(Exception):
    """Every epoch's batches have been handed out (a step that reads more than one batch, as online
    filtering does, can meet this before the planned last step)."""


@dataclass
class StreamPosition:
    epoch: int = 0
    index: int = 0  # next position in the epoch's order


class PromptStream:
    """Hands out consecutive batches of samples over `epochs` passes; a last partial batch is dropped.

    Batches never straddle epochs: with `n` samples and batch size `b`, an epoch yields
    floor(n / b) batches, so every step sees distinct samples and the ladder's order inside a step.
    """

    def __init__(
        self, samples: list[Sample], batch_size: int, epochs: int = 1, shuffle: bool = False, seed: int = 0
    ):
        if len(samples) < batch_size:
            raise InvalidValue(
                f"the data has {len(samples)} samples, fewer than one step's {batch_size} prompts"
                " (rollout.prompts_per_step)"
            )
        self.samples = samples
        self.batch_size = batch_size
        self.epochs = epochs
        self.shuffle = shuffle
        self.seed = seed
        self.position = StreamPosition()
        self._order_epoch: int | None = None
        self._order: list[int] = []

    @property
    def steps_per_epoch(self) -> int:
        return len(self.samples) // self.batch_size

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def order(self, epoch: int) -> list[int]:
        """Sample indices of `epoch`: file order, or a permutation seeded by (seed, epoch)."""
        if not self.shuffle:
            return list(range(len(self.samples)))
        if self._order_epoch != epoch:  # one permutation per epoch, not one per step
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(len(self.samples), generator=generator).tolist()
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> list[Sample]:
        pos = self.position
        if pos.index + self.batch_size > len(self.samples):
            pos = StreamPosition(pos.epoch + 1, 0)
        if pos.epoch >= self.epochs:
            raise DataExhausted("the data stream is exhausted")
        indices = self.order(pos.epoch)[pos.index : pos.index + self.batch_size]
        self.position = StreamPosition(pos.epoch, pos.index + self.batch_size)
        return [self.samples[i] for i in indices]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.position.epoch, "index": self.position.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = StreamPosition(int(state["epoch"]), int(state["index"]))


def prompt_text(sample: Sample, with_hint: bool = False, position: str = "prepend") -> str:
    """The user text for `sample`: its question, with the row's own `hint` (which `observe-r1 ladder`
    writes into stage-2 rows) before ("prepend") or after it when `with_hint` is set."""
    if not with_hint or not sample.hint:
        return sample.question
    hint = sample.hint
    return f"{hint}\n\n{sample.question}" if position == "prepend" else f"{sample.question}\n\n{hint}"
