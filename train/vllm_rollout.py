"""The vLLM rollout engine (`rollout.engine: vllm`): one vLLM `LLM` colocated in each training process.

vLLM is built from the policy's checkpoint folder and then follows the trainer: before a rollout,
`update_weights` pushes the policy's current parameters in place (vLLM's own `reload_weights`, which
takes checkpoint names and maps them, e.g. Qwen2.5-VL's `model.language_model.*`, itself) and resets
the prefix cache, the encoder cache (the scheduler's and the worker's) and the multimodal cache. The
prefix cache's reset matters: vLLM keys cached blocks by token ids alone, so without it a
prompt seen before the push would reuse keys and values computed by the old weights (a silent bug
of peer trainers; tests/test_vllm_rollout.py fails with the reset disabled). vLLM's `reload_weights`
clears the worker's encoder cache but not the scheduler's record of it, so an image prompt seen before
the push failed after it ("Encoder cache miss"; tested) until the engine reset that record too.

The G responses of a prompt are one request with `n = G`, so they share its prefill; each request's
seed is keyed to its sample (`keyed_seed`), so a response does not depend on its rank or batch. The
prompts are built by the same `process_prompt` as the transformers engine, so the update sees
identical inputs whichever engine sampled.

Where the platform has it (CUDA), vLLM sleeps between rollouts (weights offloaded, KV cache freed)
and wakes for the next one; elsewhere (the CPU build) sleep is reported unsupported once and skipped.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

import torch

from observe_r1.chat import open_images
from observe_r1.data import Sample
from observe_r1.format import SYSTEM_PROMPT
from observe_r1.modeling import tokenizer_of
from observe_r1.sampling import SamplingParams, end_of_turn_ids
from observe_r1_train.config import VLLMRolloutConfig
from observe_r1_train.rollout import (
    RolloutBatch,
    RolloutEngine,
    check_prompt_lengths,
    check_prompts,
    keyed_seed,
    process_prompt,
)

log = logging.getLogger(__name__)

_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def gathered_parameters(model, zero3: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """`model`'s parameters one at a time under their checkpoint names. Under ZeRO-3 each one is
    gathered from all ranks only while it is copied out, so no rank ever holds the whole model
    (every rank must run this loop, in the same order). Tied weights appear once (under the input
    embedding's name), as vLLM expects."""
    if not zero3:
        for name, param in model.named_parameters():
            yield name, param.detach()
        return
    import deepspeed

    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            full = param.detach().clone()
        yield name, full


def vllm_sampling(params: SamplingParams, stop_ids: list[int], seed: int, logprobs: bool):
    """`params` as `vllm.SamplingParams` for one request of `params.n` responses: every field set (no
    checkpoint defaults), stopping at `stop_ids` (the end-of-turn tokens the transformers engine stops
    at, kept in the output), the sampled token's raw log-prob when `logprobs`."""
    from vllm import SamplingParams as VSamplingParams

    return VSamplingParams(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        repetition_penalty=params.repetition_penalty,
        max_tokens=params.max_tokens,
        stop_token_ids=stop_ids,
        seed=seed,
        logprobs=0 if logprobs else None,
    )


def vllm_request(prompt: dict[str, torch.Tensor], sample: Sample, image_token_id: int | None) -> dict:
    """vLLM's prompt for one processed prompt: its token ids with each image's run of placeholders
    collapsed to one `image_token_id`, and the sample's images as `multi_modal_data`.

    vLLM expands every image placeholder it finds into the image's tokens itself, whether or not it is
    already expanded: sent the processor's expanded ids, it would expand the run's first placeholder
    again and read the rest as text (tests/test_vllm_rollout.py checks its expansion against ours)."""
    ids = prompt["input_ids"][0].tolist()
    request: dict = {"prompt_token_ids": ids}
    if sample.images:
        request["prompt_token_ids"] = [
            t for i, t in enumerate(ids) if not (t == image_token_id and i and ids[i - 1] == image_token_id)
        ]
        request["multi_modal_data"] = {"image": open_images(sample.images)}
    return request


def check_expanded(inputs: list[dict[str, torch.Tensor]], outputs) -> None:
    """vLLM's prompts, as it expanded them, must be the processor's: the trainer scores the responses
    after the latter."""
    for prompt, output in zip(inputs, outputs, strict=True):
        ours = prompt["input_ids"][0].tolist()
        if list(output.prompt_token_ids) != ours:
            raise RuntimeError(
                f"vLLM expanded a prompt to {len(output.prompt_token_ids)} tokens where the processor "
                f"made {len(ours)}: its image placeholders differ from the processor's"
            )


class VLLMRollout(RolloutEngine):
    """Samples with a vLLM `LLM` in this process (uni-process executor on one rank, vLLM's external
    launcher on several), following the trainer's weights through `update_weights`."""

    def __init__(
        self,
        model_path: str,
        processor,
        cfg: VLLMRolloutConfig,
        *,
        dtype: str,
        max_model_len: int,
        seed: int,
        world: int = 1,
        zero3: bool = False,
    ):
        on_gpu = torch.cuda.is_available()
        # The colocated engine must run in this process: weights are handed over as tensors.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_gib))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # shared machines: no pinning
        from vllm import LLM
        from vllm.platforms import current_platform

        self.processor = processor
        self.zero3 = zero3
        self.sleeps = cfg.sleep and current_platform.is_sleep_mode_available()
        if cfg.sleep and not self.sleeps:
            log.warning("rollout.vllm.sleep: this platform has no vLLM sleep mode; the engine stays awake")
        args = dict(
            model=str(model_path),
            dtype=_DTYPES[dtype],
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            enable_prefix_caching=cfg.enable_prefix_caching,
            enforce_eager=not on_gpu if cfg.enforce_eager is None else cfg.enforce_eager,
            enable_sleep_mode=self.sleeps,
            distributed_executor_backend="uni" if world == 1 else "external_launcher",
            disable_log_stats=True,
        )
        if on_gpu:
            args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if world > 1:
            args["data_parallel_size"] = world  # one independent engine per rank (tensor parallel 1)
        if cfg.block_size is not None:
            args["block_size"] = cfg.block_size
        self.llm = LLM(**args, **cfg.engine_args)
        from transformers import GenerationConfig

        tokenizer = tokenizer_of(processor)
        self.eos_ids = end_of_turn_ids(tokenizer, GenerationConfig.from_pretrained(model_path).eos_token_id)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.version = 0  # the checkpoint's own weights: what vLLM loaded
        self.asleep = False

    def update_weights(self, model, version: int) -> None:
        """Push `model`'s parameters into vLLM (one at a time) and reset the prefix cache; skipped
        when vLLM already holds `version`."""
        if version == self.version:
            return
        started = time.perf_counter()
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc(
            "reload_weights",
            kwargs={"weights_iterator": gathered_parameters(model, self.zero3), "is_checkpoint_format": True},
        )
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight push")
        # `reload_weights` clears the worker's encoder outputs but not the scheduler's record of them:
        # an image seen before the push would be taken as encoded and missed ("Encoder cache miss").
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()
        self.version = version
        log.debug("pushed weights of version %d in %.2f s", version, time.perf_counter() - started)

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
        started = time.perf_counter()
        pairs = zip(samples, prompts, strict=True)
        inputs = [process_prompt(self.processor, s, p, system_prompt) for s, p in pairs]
        check_prompt_lengths(samples, inputs, max_prompt_tokens)
        seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()))
        image_token_id = getattr(self.processor, "image_token_id", None)
        requests = [vllm_request(p, s, image_token_id) for p, s in zip(inputs, samples, strict=True)]
        params = [vllm_sampling(sampling, self.eos_ids, keyed_seed(seed, s.id), logprobs) for s in samples]
        processed = time.perf_counter()
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        check_expanded(inputs, outputs)
        if self.sleeps:
            self.llm.sleep(level=1)
            self.asleep = True
        timing = {"prepare": processed - started, "generate": time.perf_counter() - processed}
        return self._batch(samples, inputs, sampling.n, outputs, logprobs, timing)

    def _batch(self, samples, inputs, group_size, outputs, with_logprobs, timing) -> RolloutBatch:
        """vLLM's outputs as a group-contiguous `RolloutBatch`, right-padded with `pad_id`."""
        choices = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]
        width = max(len(c.token_ids) for c in choices)
        ids = torch.full((len(choices), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(choices), width), dtype=torch.long)
        logprobs = torch.zeros((len(choices), width)) if with_logprobs else None
        for row, choice in enumerate(choices):
            n = len(choice.token_ids)
            ids[row, :n] = torch.tensor(choice.token_ids)
            mask[row, :n] = 1
            if logprobs is not None:
                logprobs[row, :n] = torch.tensor(
                    [step[t].logprob for step, t in zip(choice.logprobs, choice.token_ids, strict=True)]
                )
        lengths = mask.sum(1).tolist()
        texts = tokenizer_of(self.processor).batch_decode(
            [row[:n] for row, n in zip(ids, lengths, strict=True)], skip_special_tokens=True
        )
        return RolloutBatch(
            samples=list(samples),
            prompt_inputs=inputs,
            group_size=group_size,
            completion_ids=ids,
            completion_mask=mask,
            texts=texts,
            finish_reasons=["stop" if c.finish_reason == "stop" else "length" for c in choices],
            pad_id=self.pad_id,
            timing=timing,
            logprobs=logprobs,
        )

    def close(self) -> None:
        """Shut vLLM's engine down (its KV cache and weights are freed with it)."""
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
