"""DeepSpeed set-up: process group, the engine's JSON config, the client AdamW and the LR schedule.

One place builds the DeepSpeed engine for both the GRPO trainer and the SFT warm start, so they
share precision, ZeRO stage, clipping and schedule semantics. The optimizer is a client
`torch.optim.AdamW` (DeepSpeed's own fused Adam JIT-compiles for ~50 s on a CPU and needs CUDA
for speed elsewhere); with optimizer offload it is DeepSpeed's CPU Adam, which offload requires.
"""

from __future__ import annotations

import logging
import math
import os
from functools import partial
from typing import Any

import torch

from observe_r1.net import free_port

log = logging.getLogger(__name__)


def cosine_lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier at optimizer step `step` (0-based): linear warm-up, then cosine to `min_ratio`.

    f = (step + 1) / warmup_steps during warm-up, then
    f = min_ratio + (1 - min_ratio) * (1 + cos(pi * progress)) / 2, progress = (step - warmup) /
    (total - warmup), clamped to [0, 1]. This is transformers' "cosine_with_min_lr" schedule
    that the authors' OpenRLHF script uses (lr 1e-6, min lr 0.1 x lr, warm-up 3%), except that the
    first warm-up step already trains at lr / warmup_steps rather than at 0.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warm-up length in optimizer steps: ceil(ratio x total), as OpenRLHF computes it."""
    return math.ceil(warmup_ratio * total_steps)


def _skip_shared_memory_op() -> None:
    """Keep DeepSpeed's CPU communication backend from JIT-compiling its shared-memory all-reduce.

    Every CPU process group would otherwise compile (30-120 s on 2 cores, again for every new venv
    path) and load the op under torch's file lock in ~/.cache/torch_extensions; a process killed
    while it holds that lock (Ctrl-C during start-up, a timeout) leaves the file behind and every
    later run waits on it forever. The op only speeds up all-reduce between CPU ranks of one host,
    which gloo does correctly; GPU runs use NCCL and never build it. DeepSpeed reads this table of
    compatible ops before it builds one.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def init_distributed() -> tuple[int, int]:
    """Join (or, for a plain `python` run, create) the process group; returns (rank, world size).

    torchrun and the deepspeed launcher set RANK/WORLD_SIZE/MASTER_*; a single process gets them
    here so the same code path runs everywhere. CPUs use gloo, GPUs NCCL (DeepSpeed's choice).
    """
    import deepspeed
    import torch.distributed as dist

    if not torch.cuda.is_available():
        _skip_shared_memory_op()
    if not dist.is_initialized():
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _merge(base: dict, extra: dict) -> dict:
    """Recursive dict merge: `extra` wins; nested dicts merge key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def deepspeed_config(
    *,
    train_batch: int,
    micro_batch: int,
    grad_accumulation: int,
    zero_stage: int,
    bf16: bool,
    grad_clip: float,
    offload: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed JSON config; `extra` (config `deepspeed.extra`) is merged in last, as is.

    train_batch = micro_batch x grad_accumulation x world size (DeepSpeed checks it). A client
    optimizer under ZeRO needs `zero_allow_untested_optimizer`. ZeRO-3 gathers the full weights
    when the model is saved, so the Hugging Face export works at every stage.
    """
    zero: dict[str, Any] = {"stage": zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {
        "train_batch_size": train_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accumulation,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # our own logger reports; DeepSpeed's would repeat it
        "wall_clock_breakdown": False,
    }
    return _merge(config, extra or {})


def make_optimizer(params, *, lr: float, betas, weight_decay: float, offload: bool) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (DeepSpeed's CPU Adam when the optimizer is offloaded)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters (is everything frozen?)")
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def make_scheduler(optimizer, *, total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """A LambdaLR of `cosine_lr_factor`; DeepSpeed steps it once per optimizer step and checkpoints it."""
    factor = partial(
        cosine_lr_factor,
        total_steps=total_steps,
        warmup_steps=warmup_steps(total_steps, warmup_ratio),
        min_ratio=min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def initialize(model, config: dict, optimizer=None, scheduler=None):
    """`deepspeed.initialize` with our config; returns the engine (which wraps `model`)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine
