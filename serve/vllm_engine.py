"""The vLLM engine: vLLM's async engine (`AsyncLLM`) behind the same interface as the transformers one.

vLLM does its own continuous batching, so this engine only maps requests onto it: the rendered
prompt plus images as `multi_modal_data` (or a completion's token ids), per-request `SamplingParams`
with delta outputs, and `abort` when the client goes away. Bounding the queue is ours: vLLM would
accept everything. Log-probabilities are vLLM's raw ones (`logprobs_mode=raw_logprobs`, set here so
that the definition cannot drift from the transformers engine's).
"""

from __future__ import annotations

import difflib
import itertools
import os
from collections.abc import AsyncIterator
from dataclasses import fields

from observe_r1.errors import UserError
from observe_r1_serve.config import ServerConfig, check_vllm_options
from observe_r1_serve.engine import (
    ChoiceDelta,
    Engine,
    EngineRequest,
    EngineStats,
    PromptTooLongError,
    QueueFullError,
    TokenBytes,
    TokenLogprob,
)
from observe_r1_serve.image_rules import ImageRules
from observe_r1_serve.protocol import MAX_LOGPROBS

# Defaults for CPU builds of vLLM: a bounded KV cache (GiB) instead of a large share of RAM, no
# OpenMP core pinning on shared machines, and the model worker inside the engine-core process
# (half the start-up time). Set before vLLM is imported; the environment can override them.
_CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "4",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def engine_args(config: ServerConfig, on_gpu: bool):
    """vLLM's `AsyncEngineArgs` for `config`. The pass-through `--vllm-engine-args` may add any other
    argument, but not one the server sets itself (its own flag, or derived from one)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    dtype = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[config.dtype]
    ours = dict(
        model=str(config.model),
        served_model_name=config.model_name,
        dtype=dtype if on_gpu or dtype != "auto" else "float32",
        max_model_len=config.context_length,
        max_num_seqs=config.max_num_seqs or config.max_batch_size,
        tensor_parallel_size=config.tensor_parallel_size,
        gpu_memory_utilization=config.gpu_memory_utilization,
        limit_mm_per_prompt={"image": config.max_images_per_request},
        enforce_eager=not on_gpu,  # CPU: no graph capture or compilation, start in seconds
        disable_log_stats=True,
        logprobs_mode="raw_logprobs",  # the model's own distribution, as the transformers engine returns
        max_logprobs=MAX_LOGPROBS,
    )
    extra = check_vllm_options(config)
    known = {f.name for f in fields(AsyncEngineArgs)}
    for key in extra:
        if key in ours:
            raise UserError(f"--vllm-engine-args sets '{key}', which the server sets itself (see --help)")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"--vllm-engine-args: '{key}' is not an argument of vLLM's engine{hint}")
    return AsyncEngineArgs(**ours, **extra)


class VLLMEngine(Engine):
    def __init__(self, config: ServerConfig):
        import torch

        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            for key, value in _CPU_ENV.items():
                os.environ.setdefault(key, value)
        from vllm.v1.engine.async_llm import AsyncLLM

        self.config = config
        self.name = "vllm"
        self.engine = AsyncLLM.from_engine_args(engine_args(config, on_gpu))
        self.tokenizer = self.engine.get_tokenizer()
        self.token_bytes = TokenBytes(self.tokenizer)
        self.vocab_size = self.engine.model_config.get_vocab_size()
        self.stats = EngineStats()
        self._ids = itertools.count()
        # The image processor vLLM runs (the checkpoint's), read here for its rules and token counts.
        self._image_processor = None
        self.image_rules = None
        if self.engine.model_config.is_multimodal_model:
            from transformers import AutoImageProcessor

            self._image_processor = AutoImageProcessor.from_pretrained(config.model)
            self.image_rules = ImageRules.of(self._image_processor)

    def render_prompt(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _image_tokens(self, request: EngineRequest) -> int:
        """Placeholder tokens the images expand into (vLLM expands them after this check)."""
        if not request.images:
            return 0
        ip = self._image_processor
        patches = sum(ip.get_number_of_image_patches(img.height, img.width, {}) for img in request.images)
        return patches // (ip.merge_size**2) - len(request.images)

    async def prepare(self, request: EngineRequest, max_prompt_tokens: int) -> None:
        ids = request.prompt_token_ids
        if ids is None:
            ids = self.tokenizer.encode(request.prompt, add_special_tokens=False)
        request.prompt_tokens = len(ids) + self._image_tokens(request)
        if request.prompt_tokens > max_prompt_tokens:
            raise PromptTooLongError(request.prompt_tokens, max_prompt_tokens)
        # With images, vLLM's processor expands the placeholders from the text; without, token ids
        # spare it a second tokenisation.
        if request.images:
            request.inputs = {"prompt": request.prompt, "multi_modal_data": {"image": request.images}}
        else:
            request.inputs = {"prompt_token_ids": ids}

    def generate(self, request: EngineRequest) -> AsyncIterator[ChoiceDelta]:
        if self.stats.running + self.stats.waiting >= self.config.max_batch_size + self.config.max_waiting:
            raise QueueFullError(f"{self.stats.running + self.stats.waiting} requests are in flight")
        self.stats.waiting += 1
        return self._stream(request)

    async def _stream(self, request: EngineRequest) -> AsyncIterator[ChoiceDelta]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = request.sampling
        params = SamplingParams(
            n=s.n,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            repetition_penalty=s.repetition_penalty,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            logit_bias=dict(s.logit_bias) or None,
            min_tokens=s.min_tokens,
            ignore_eos=s.ignore_eos,
            logprobs=s.logprobs,
            prompt_logprobs=s.prompt_logprobs,
            max_tokens=s.max_tokens,
            stop=list(s.stop),
            # vLLM seeds a 64-bit generator; a request may bring any integer (as our engine takes).
            seed=None if s.seed is None else s.seed % 2**63,
            output_kind=RequestOutputKind.DELTA,
        )
        request_id = f"{request.request_id}-{next(self._ids)}"
        tokens = [0] * s.n
        pending: list[tuple[TokenLogprob, ...]] = [()] * s.n
        open_choices = s.n
        started = False
        try:
            async for output in self.engine.generate(request.inputs, params, request_id):
                if not started:
                    started = True
                    self.stats.waiting -= 1
                    self.stats.running += 1
                    if s.prompt_logprobs is not None:
                        request.prompt_logprobs = [
                            None if p is None else _entries([t], [p], s.prompt_logprobs)[0]
                            for t, p in zip(output.prompt_token_ids, output.prompt_logprobs, strict=True)
                        ]
                if request.score_only:
                    # vLLM generates at least one token: the prompt is scored, the token is dropped.
                    for index in range(s.n):
                        yield ChoiceDelta(index, "", 0, "length")
                    open_choices = 0
                    break
                for choice in output.outputs:
                    tokens[choice.index] += len(choice.token_ids)
                    reason = choice.finish_reason if choice.finish_reason in ("stop", "length") else None
                    open_choices -= reason is not None
                    if s.logprobs is not None:
                        pending[choice.index] += _entries(choice.token_ids, choice.logprobs, s.logprobs)
                    # As in the transformers engine, entries wait for the delta that carries their text.
                    if choice.text or reason:
                        entries, pending[choice.index] = pending[choice.index], ()
                        yield ChoiceDelta(choice.index, choice.text, tokens[choice.index], reason, entries)
        finally:
            if started:
                self.stats.running -= 1
            else:
                self.stats.waiting -= 1
            if open_choices or request.score_only:
                await self.engine.abort(request_id)

    async def shutdown(self) -> None:
        self.engine.shutdown()


def _entries(token_ids, positions, k: int) -> tuple[TokenLogprob, ...]:
    """vLLM's log-probabilities (per position, token id -> Logprob with its rank; the sampled token is
    always there, ranked or not among the top k) as one entry per token with its top k by rank."""
    out = []
    for token, position in zip(token_ids, positions, strict=True):
        ranked = sorted((lp.rank, -lp.logprob, tid) for tid, lp in position.items() if lp.rank <= k)
        top = tuple((tid, -neg) for _, neg, tid in ranked)
        out.append(TokenLogprob(token, position[token].logprob, top))
    return tuple(out)
