"""Training-state checkpoints (atomic, last K kept, resumable) and the Hugging Face export.

Layout under the run's output folder:

    checkpoints/step-00000010/state/…          DeepSpeed: weights, optimizer, LR scheduler (all ranks)
    checkpoints/step-00000010/rng-rank0.pt     each rank's Python/NumPy/torch RNG states
    checkpoints/step-00000010/trainer.json     step, data position, anything else the loop keeps
    model/                                     the final Hugging Face folder

A checkpoint is written into `.step-N.partial` and renamed once every rank has finished, so a
folder named `step-N` is always complete; a run killed while saving leaves only a partial folder,
which the next start removes. Ranks must share the output folder (one machine, or a shared file
system).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from observe_r1.errors import MissingFile
from observe_r1.io import atomic_dir, atomic_write_text
from observe_r1.modeling import tokenizer_of
from observe_r1.sampling import SamplingParams, end_of_turn_ids, trained_generation_config

CHECKPOINTS = "checkpoints"
STATE_TAG = "state"
TRAINER_STATE = "trainer.json"
_NAME = re.compile(r"step-(\d+)")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a trainer state) as (step, folder), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    found = []
    for path in root.glob("step-*") if root.is_dir() else ():
        match = _NAME.fullmatch(path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_partial(output_dir: Path) -> None:
    """Delete checkpoint folders a killed run left half-written (rank 0 only, then all ranks wait)."""
    root = Path(output_dir) / CHECKPOINTS
    if _rank() == 0 and root.is_dir():
        for path in root.glob(".step-*.partial"):
            shutil.rmtree(path, ignore_errors=True)
    _barrier()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, output_dir: Path, step: int, trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint `step` from every rank, publish it atomically, then keep only the last K."""
    final = checkpoint_path(output_dir, step)
    staging = final.with_name(f".{final.name}.partial")
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(staging), tag=STATE_TAG, save_latest=False)
    torch.save(rng_state(), staging / f"rng-rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        atomic_write_text(staging / TRAINER_STATE, json.dumps({"step": step, **trainer_state}, indent=2))
        staging.rename(final)
        for _, old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(engine, path: Path) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG from `path`; returns the trainer state."""
    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        raise MissingFile(f"{path} is not a complete checkpoint (no {TRAINER_STATE})")
    loaded, _ = engine.load_checkpoint(
        str(path), tag=STATE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if loaded is None:
        raise MissingFile(f"DeepSpeed found no state in {path / STATE_TAG}")
    rng_file = path / f"rng-rank{_rank()}.pt"
    if not rng_file.is_file():
        raise MissingFile(f"{rng_file} is missing: was the checkpoint written with another world size?")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / TRAINER_STATE).read_text())


def export_hf(engine, processor, target: Path, sampling: SamplingParams) -> Path:
    """Write the policy as a Hugging Face folder that transformers, vLLM and `observe-r1 serve` load.

    Weights in the training precision (bf16 or fp32), config, tokenizer, image processor, chat template
    and a generation config that states `sampling` (the sampling the model was trained with), so that
    plain vLLM and this project's server sample it alike; written atomically (rank 0), with ZeRO-3
    weights gathered first.
    """
    import deepspeed

    module = engine.module
    zero3 = engine.zero_optimization_stage() == 3
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3):
        if _rank() == 0:
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            with atomic_dir(target, overwrite=True) as staging:
                module.save_pretrained(staging, state_dict=state, safe_serialization=True)
                processor.save_pretrained(staging)
                tokenizer, saved = tokenizer_of(processor), module.generation_config
                eos = end_of_turn_ids(tokenizer, saved.eos_token_id)
                pad = saved.pad_token_id if saved.pad_token_id is not None else tokenizer.pad_token_id
                trained_generation_config(sampling, eos, pad, saved.bos_token_id).save_pretrained(staging)
    _barrier()
    return Path(target)
