"""How a response is sampled: one type for every path, the policy that fills it, and its one conversion
for transformers' `generate`.

The policy (docs/architecture.md, "Sampling"):
- Training rollouts, the ladder and eval sample with exactly the configured settings, whatever the
  checkpoint's generation config says.
- The server (both engines) and `observe-r1 chat`: what the request or the command line sets wins; what
  it leaves unset comes from the checkpoint's `generation_config.json`, as vLLM does by default
  (`--generation-config auto`); with `none` the checkpoint's file is ignored and the neutral values
  below apply (vLLM's `--generation-config vllm`).
- An exported checkpoint states the sampling it was trained with (`trained_generation_config`), so it
  behaves alike under this server and under plain vLLM.

`observe_r1.modeling.load_model` leaves no sampling settings on the model's own generation config, so
`generate` cannot fill anything from the checkpoint behind the caller's back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from observe_r1.errors import InvalidValue, UserError

# The settings a checkpoint's generation config may supply, with the values that apply when nobody
# sets them: plain sampling from the model's distribution (OpenAI's and vLLM's defaults).
NEUTRAL: dict[str, float | int] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
GENERATION_CONFIG_FILE = "generation_config.json"
DefaultsSource = Literal["auto", "none"]
END_OF_TURN = "<|im_end|>"


class SamplingError(InvalidValue):
    """A sampling setting out of its range; the message names the setting."""


@dataclass(frozen=True)
class SamplingParams:
    """The settings of one sampling call, every one explicit.

    `temperature` 0 is greedy decoding. `top_p` keeps the smallest set of most likely tokens whose mass
    reaches it (nucleus sampling, Holtzman et al., 2020); `top_k` 0 means no top-k cut;
    `repetition_penalty` divides the positive logits (multiplies the negative ones) of every token
    already in the prompt or the response (Keskar et al., 2019, CTRL), 1.0 being none. `n` responses of
    at most `max_tokens` tokens each; generation stops before any of `stop`. `seed` None: unseeded.

    The server's further settings, as OpenAI and vLLM define them (neutral by default, so the training
    paths never meet them): `presence_penalty` is subtracted from the logit of every token the response
    holds already, `frequency_penalty` times the number of times it holds it (the prompt does not
    count); `logit_bias` adds its value to the logit of its token id; for the first `min_tokens`
    tokens the end-of-sequence tokens cannot be drawn (nor stop strings end the response);
    `ignore_eos` lets an end-of-sequence token be drawn and generation go on to `max_tokens`.
    `logprobs` k: each generated token's log-probability and the k most likely tokens' (k may be 0);
    `prompt_logprobs` k: the same for every prompt token after the first. Log-probabilities are the
    model's own (raw) distribution, before the logit bias, penalties, temperature and top-k/top-p,
    as vLLM returns them by default (`logprobs_mode=raw_logprobs`).
    """

    temperature: float = NEUTRAL["temperature"]
    top_p: float = NEUTRAL["top_p"]
    top_k: int = NEUTRAL["top_k"]
    repetition_penalty: float = NEUTRAL["repetition_penalty"]
    max_tokens: int = 256
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "temperature": math.isfinite(self.temperature) and self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= 0,
            "repetition_penalty": math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
            "max_tokens": self.max_tokens >= 1,
            "n": self.n >= 1,
            "presence_penalty": -2 <= self.presence_penalty <= 2,
            "frequency_penalty": -2 <= self.frequency_penalty <= 2,
            "logit_bias": all(t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias.items()),
            "min_tokens": 0 <= self.min_tokens <= self.max_tokens,
            "logprobs": self.logprobs is None or self.logprobs >= 0,
            "prompt_logprobs": self.prompt_logprobs is None or self.prompt_logprobs >= 0,
        }
        rules = {
            "temperature": "a finite number >= 0",
            "top_p": "in (0, 1]",
            "top_k": ">= 0 (0: no cut)",
            "repetition_penalty": "a finite number > 0 (1: none)",
            "max_tokens": ">= 1",
            "n": ">= 1",
            "presence_penalty": "in [-2, 2]",
            "frequency_penalty": "in [-2, 2]",
            "logit_bias": "token ids >= 0 with biases in [-100, 100]",
            "min_tokens": "in [0, max_tokens]",
            "logprobs": "None or >= 0",
            "prompt_logprobs": "None or >= 0",
        }
        for name, ok in checks.items():
            if not ok:
                raise SamplingError(f"{name}={getattr(self, name)!r}: must be {rules[name]}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def checkpoint_defaults(model_dir: str | Path) -> dict[str, float | int]:
    """The sampling settings that the model folder's generation_config.json sets (only those of `NEUTRAL`;
    an absent file sets none). `do_sample` is not read: like vLLM, the values themselves are the defaults."""
    path = Path(model_dir) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e
    return {key: saved[key] for key in NEUTRAL if saved.get(key) is not None}


def resolve(
    requested: Mapping[str, Any], defaults: Mapping[str, float | int]
) -> tuple[dict[str, float | int], dict[str, str]]:
    """The policy for the server and chat: per setting of `NEUTRAL`, the requested value where it is not
    None, else the checkpoint's default, else the neutral value. Returns the values and, per setting,
    where it came from ("request", "checkpoint" or "neutral")."""
    values, sources = {}, {}
    for key, neutral in NEUTRAL.items():
        if requested.get(key) is not None:
            values[key], sources[key] = requested[key], "request"
        elif key in defaults:
            values[key], sources[key] = defaults[key], "checkpoint"
        else:
            values[key], sources[key] = neutral, "neutral"
    return values, sources


def describe(values: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> str:
    """`temperature=1.0 (request), top_k=1 (checkpoint), ...` for logs and `chat`."""
    return ", ".join(f"{k}={values[k]}" + (f" ({sources[k]})" if sources else "") for k in NEUTRAL)


def end_of_turn_ids(tokenizer, eos_token_id: int | list[int] | None) -> list[int]:
    """The tokens that end a response: the checkpoint's end-of-sequence ids, the tokenizer's, and
    Qwen's end-of-turn token where the vocabulary has it (a chat turn ends there)."""
    ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(turn, int) and turn != tokenizer.unk_token_id:
        ids.add(turn)
    return sorted(ids)


_PLAIN = SamplingParams()


def to_generation_config(params: SamplingParams, eos_ids: list[int], pad_id: int, **extra):
    """`params` as a transformers `GenerationConfig` for one `generate` call of `params.n` rows per prompt
    (stop strings and seeds are the caller's). Every sampling field is set, so nothing comes from the
    model's own generation config; `extra` adds output options (`return_dict_in_generate`, ...)."""
    from transformers import GenerationConfig

    # Settings this conversion has no faithful equivalent for (generate() has no presence or frequency
    # penalty and returns no raw log-probabilities): the serving engines apply them themselves.
    for name in (
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "ignore_eos",
        "logprobs",
        "prompt_logprobs",
    ):
        if getattr(params, name) != getattr(_PLAIN, name):
            raise SamplingError(f"{name}={getattr(params, name)!r}: not available through generate()")
    sampling = (
        {"do_sample": False}
        if params.greedy
        else {
            "do_sample": True,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
        }
    )
    return GenerationConfig(
        max_new_tokens=params.max_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        repetition_penalty=params.repetition_penalty,
        **({"min_new_tokens": params.min_tokens} if params.min_tokens else {}),
        **sampling,
        **extra,
    )


def trained_generation_config(params: SamplingParams, eos_ids: list[int], pad_id: int, bos_id: int | None):
    """The generation config an exported checkpoint carries: the sampling it was trained with
    (temperature and top-p of the rollout, no top-k cut, no penalty), which vLLM and this server both
    take as their defaults."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=not params.greedy,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        repetition_penalty=params.repetition_penalty,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
    )
