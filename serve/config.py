"""Server settings (every limit is a named option) and the error type the app turns into OpenAI errors."""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from observe_r1.errors import InvalidValue, UserError
from observe_r1.format import DEFAULT_VARIANT, FormatVariant, variant_spec

EngineName = Literal["auto", "transformers", "vllm"]  # auto: vLLM where installed and a GPU is present
Dtype = Literal["auto", "bf16", "fp16", "fp32"]  # auto: bf16 on GPU, fp32 on CPU
# auto: sampling settings a request leaves out come from the model's generation_config.json (vLLM's
# default); none: that file is ignored and the neutral values apply (vLLM's `--generation-config vllm`).
GenerationDefaults = Literal["auto", "none"]


@dataclass
class ServerConfig:
    model: Path
    engine: EngineName = "auto"
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    system_prompt: str | None = None  # None: format_variant's built-in prompt; "": no system prompt
    nested_observe: bool = False  # format check also accepts <observe> nested in <think> (observe only)
    # The format the model answers in (observe_r1.format.VARIANTS): observe, or think (no observe block,
    # so every choice's observation is empty); it picks the system prompt and the format check.
    format_variant: FormatVariant = DEFAULT_VARIANT
    dtype: Dtype = "auto"
    generation_config: GenerationDefaults = "auto"
    # Limits on what one request may ask for.
    max_body_bytes: int = 20 * 1024 * 1024
    max_images_per_request: int = 8
    max_image_pixels: int = 4096 * 4096
    max_prompt_tokens: int = 16384
    max_completion_tokens: int = 4096
    default_max_tokens: int = 1024
    max_n: int = 8
    allow_local_images: bool = False
    # A request field that is no parameter of its endpoint: ignored with a warning (in the log and the
    # X-Observe-R1-Ignored-Params header), as vLLM does; with this, refused by name.
    reject_unknown_params: bool = False
    # http(s) image URLs, fetched under the rules of observe_r1_serve.fetch (no private addresses).
    allow_remote_images: bool = True
    image_fetch_timeout_s: float = 10.0  # the whole fetch, redirects included
    image_fetch_max_bytes: int = 20 * 1024 * 1024
    image_fetch_max_redirects: int = 3
    image_fetch_allowed_domains: tuple[str, ...] = ()  # empty: every host; "*.example.com": its subdomains
    # Also fetch from loopback, private, link-local, CGNAT and IPv6 unique-local addresses (a
    # cluster-internal image store); cloud metadata addresses stay refused.
    image_fetch_allow_private: bool = False
    # Scheduling: how many sequences share one generate call, and how many requests may wait.
    max_batch_size: int = 32
    max_waiting: int = 256
    batch_wait_ms: float = 30.0  # a batch starts once no new request has arrived for this long ...
    max_batch_wait_ms: float = 500.0  # ... or this long after its first request, whichever is first
    # Prefill the shared system turn once and start every batch from its cached keys and values.
    prefix_cache: bool = True
    retry_after_s: int = 1
    shutdown_timeout_s: float = 30.0
    # vLLM engine (engine vllm): how it spreads the model over GPUs and sizes its KV cache.
    tensor_parallel_size: int = 1  # GPUs one replica's model is split over
    gpu_memory_utilization: float = 0.9  # share of each GPU's memory for weights, activations and KV cache
    max_model_len: int | None = None  # context length; None: max_prompt_tokens + max_completion_tokens
    max_num_seqs: int | None = None  # sequences vLLM batches together; None: max_batch_size
    vllm_engine_args: str | None = (
        None  # a JSON object of further AsyncEngineArgs: '{"enable_chunked_prefill": true}'
    )

    @property
    def context_length(self) -> int:
        """Prompt and completion tokens a sequence may hold (`max_model_len`, or the two limits' sum)."""
        return self.max_model_len or self.max_prompt_tokens + self.max_completion_tokens

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(ServerConfig)
        for f in fields(self):
            if typing.get_origin(hints[f.name]) is Literal and getattr(self, f.name) not in typing.get_args(
                hints[f.name]
            ):
                allowed = ", ".join(typing.get_args(hints[f.name]))
                raise InvalidValue(f"{f.name}={getattr(self, f.name)!r}: expected one of {allowed}")
        variant_spec(self.format_variant, self.nested_observe, ("--nested-observe", "--format-variant"))

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.name


def check_vllm_options(config: ServerConfig) -> dict:
    """Refuses out-of-range vLLM options, naming the flag; returns the pass-through engine arguments."""
    if config.tensor_parallel_size < 1:
        raise UserError(f"--tensor-parallel-size must be at least 1, not {config.tensor_parallel_size}")
    if not 0 < config.gpu_memory_utilization <= 1:
        raise UserError(f"--gpu-memory-utilization must be in (0, 1], not {config.gpu_memory_utilization}")
    for name in ("max_model_len", "max_num_seqs"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if config.vllm_engine_args is None:
        return {}
    try:
        extra = json.loads(config.vllm_engine_args)
    except json.JSONDecodeError as e:
        raise UserError(f"--vllm-engine-args is not JSON: {e}") from e
    if not isinstance(extra, dict):
        raise UserError(f"--vllm-engine-args must be a JSON object, not {type(extra).__name__}")
    return extra


class RequestError(Exception):
    """A client error, sent as an OpenAI error object with `status` and the offending `param`."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        type_: str = "invalid_request_error",
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code
        self.type = type_
        self.retry_after = retry_after


def read_api_key(env_value: str | None, key_file: Path | None) -> str | None:
    """The API key from a file (first line, stripped) or an environment variable; the file wins."""
    if key_file is not None:
        key = key_file.read_text().strip()
        if not key:
            raise InvalidValue(f"API key file {key_file} is empty")
        return key
    return env_value or None
