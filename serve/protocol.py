"""The OpenAI schema as this server speaks it (`POST /v1/chat/completions`, `POST /v1/completions`),
plus the Observe-R1 fields.

Chat responses add, on each message and delta: `observation` (the observe block), `reasoning` (the
think block, also as `reasoning_content`, the older vLLM name), `format_ok`/`format_errors` on each
choice, and `raw` when `return_raw_text` is set.

Every OpenAI parameter is declared, with the values it accepts: one this server cannot honour
(`tools`, `response_format` other than text, `audio`, ...) accepts only its neutral value, so the
schema says so and any other value is a 400 naming it (`REFUSED` gives the reason). A field that is
no parameter at all is kept in `model_extra`: ignored with a warning, or refused by name with
`--reject-unknown-params` (observe_r1_serve.serving).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_LOGPROBS = 20  # top_logprobs and completion logprobs: OpenAI's bound, and vLLM's max_logprobs
MAX_STOP_STRINGS = 4
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

# Why each refused parameter is refused; its only accepted value is the neutral one.
REFUSED = {
    "tools": "this server does not call tools",
    "tool_choice": "this server does not call tools (only 'none')",
    "functions": "this server does not call functions",
    "function_call": "this server does not call functions (only 'none')",
    "response_format": "structured output is not supported (only {'type': 'text'})",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported (['text'])",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "the reasoning length cannot be set (the model reasons as trained)",
    "verbosity": "the answer length cannot be set this way (use max_tokens)",
    "web_search_options": "this server does not search the web",
    "suffix": "insertion (a suffix after the completion) is not supported",
    "best_of": "server-side ranking of completions is not supported (only 1)",
}


def _integral(value: Any) -> Any:
    """JSON Schema's integers include 3.0: a whole float is taken as the integer it is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**bounds: int) -> Any:
    """An integer field type with `bounds` (ge, le), whole floats taken. The bounds go before the
    validator: after it, pydantic cannot put them into the JSON schema of a union member."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


Int = integer()
TokenId = integer(ge=0)
StopString = Annotated[str, Field(min_length=1)]


class _Request(BaseModel):
    """Request parts are validated strictly: "yes" is not a boolean and "2" is not a number."""

    model_config = ConfigDict(strict=True)


class ImageURL(_Request):
    url: str = Field(
        json_schema_extra={"format": "image-url"},
        description="a data: URL of an image (base64), an http(s) URL, or with --allow-local-images a "
        "local path; the image must decode and fit the server's image limits",
    )
    detail: Literal["auto", "low", "high"] | None = Field(default=None, description="accepted, no effect")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Request):
    """A turn. Fields a client echoes back from our responses (`reasoning`, `observation`, `raw`,
    `refusal`, ...) are ignored; tool calls cannot be, as this server makes none."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, description="accepted, no effect (the chat template has no names)")
    tool_calls: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = Field(
        default=None, description="refused: this server makes no tool calls"
    )
    function_call: None = Field(default=None, description="refused: this server makes no function calls")
    audio: None = Field(default=None, description="refused: no audio")


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: bool = Field(default=False, description="accepted, no effect (no obfuscation)")


class ResponseFormatText(_Request):
    type: Literal["text"]


def _refused(description: str = "") -> Any:
    return Field(default=None, description=f"refused unless null{description}")


class _SamplingFields(_Request):
    """The sampling parameters both endpoints take. Settings left out (None) take the model's
    generation-config defaults (`--generation-config`)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    n: Int = Field(default=1, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: integer(ge=-1) | None = Field(default=None, description="vLLM's extra: 0 or -1 for no top-k cut")
    # Bounded where float32 logits stay finite: a penalty of 1e-300 would turn a logit into inf.
    repetition_penalty: Annotated[float, Field(ge=0.01, le=100.0)] | None = Field(
        default=None, description="vLLM's extra: 1 for none"
    )
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        default=None, description="token id (as a string) -> bias added to its logit"
    )
    min_tokens: integer(ge=0) | None = Field(
        default=None, description="vLLM's extra: no end token (nor stop string) before this many tokens"
    )
    ignore_eos: bool = Field(
        default=False, description="vLLM's extra: generate past end tokens, up to max_tokens"
    )
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Int | None = Field(default=None, description="any integer: the same seed, the same answer")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, description="accepted, no effect")


class ChatCompletionRequest(_SamplingFields):
    """The chat request body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: integer(ge=1) | None = Field(default=None)
    max_completion_tokens: integer(ge=1) | None = Field(default=None)
    logprobs: bool = Field(default=False, description="return each generated token's raw log-probability")
    top_logprobs: integer(ge=0, le=MAX_LOGPROBS) | None = Field(
        default=None,
        description="with logprobs: the most likely tokens at each position",
    )
    return_raw_text: bool = Field(default=False, description="also return the model's raw text as `raw`")
    # Accepted without effect on the answer.
    metadata: dict[str, str] | None = Field(default=None, description="accepted, no effect")
    store: bool | None = Field(default=None, description="accepted, no effect (nothing is stored)")
    service_tier: str | None = Field(default=None, description="accepted, no effect")
    prompt_cache_key: str | None = Field(default=None, description="accepted, no effect")
    safety_identifier: str | None = Field(default=None, description="accepted, no effect")
    parallel_tool_calls: bool | None = Field(default=None, description="accepted, no effect (no tools)")
    # Refused unless neutral (REFUSED says why).
    tools: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = _refused(" or empty")
    tool_choice: Literal["none"] | None = _refused(" or 'none'")
    functions: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = _refused(" or empty")
    function_call: Literal["none"] | None = _refused(" or 'none'")
    response_format: ResponseFormatText | None = _refused(" or {'type': 'text'}")
    audio: None = _refused()
    modalities: list[Literal["text"]] | None = _refused(" or ['text']")
    prediction: None = _refused()
    reasoning_effort: None = _refused()
    verbosity: None = _refused()
    web_search_options: None = _refused()


Prompt = (
    Annotated[str, Field(min_length=1)]
    | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
)


class CompletionRequest(_SamplingFields):
    """The plain-completion request body (OpenAI's legacy `POST /v1/completions`): no chat template,
    no system prompt, no parsing into fields."""

    prompt: Prompt = Field(description="a text, several texts, a list of token ids, or several such lists")
    max_tokens: integer(ge=0) | None = Field(
        default=None,
        description="0 with echo: score the prompt only; default 16 (at most the server's limit)",
    )
    echo: bool = Field(default=False, description="return the prompt before the completion")
    logprobs: integer(ge=0, le=MAX_LOGPROBS) | None = Field(
        default=None,
        description="the sampled token's raw log-probability and the k most likely tokens' at each position",
    )
    best_of: Literal[1] | None = _refused(" or 1")
    suffix: None = _refused()


class CompletionTokensDetails(BaseModel):
    """Tokens of each block's text, over all choices (each text tokenised on its own)."""

    reasoning_tokens: int = 0
    observation_tokens: int = 0
    answer_tokens: int = 0


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Usage(CompletionUsage):
    completion_tokens_details: CompletionTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] = Field(description="the token's exact bytes (a token may hold part of a character)")


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """OpenAI's chat log-probabilities: one entry per generated token of the raw text (all three blocks)."""

    content: list[TokenLogprobEntry]


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning: str
    reasoning_content: str
    observation: str
    raw: str | None = None


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: Literal["stop", "length"]
    format_ok: bool
    format_errors: list[str]
    logprobs: ChoiceLogprobs | None = None


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    observation: str | None = None
    raw: str | None = None


class StreamChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    format_ok: bool | None = None
    format_errors: list[str] | None = None
    logprobs: ChoiceLogprobs | None = None  # the entries of the tokens whose raw text this chunk carries


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[StreamChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: per token its text, log-probability (None for the first prompt token),
    its top tokens with the sampled one (None likewise), and its character offset in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


def _text_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionResponse(BaseModel):
    """A plain completion; streamed, each event is one of these with the new text (`usage` on the
    last one with `stream_options.include_usage`, with no choices)."""

    id: str = Field(default_factory=_text_completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class TokenizeRequest(_Request):
    """POST /tokenize, vLLM's endpoint for a plain prompt: its token ids in the served model's
    tokenizer. No special tokens are added (Qwen's tokenizers add none), so `add_special_tokens`
    true is refused by name; eval/run.py counts the observation, reasoning and answer with it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str
    add_special_tokens: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "observe-r1"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def dump(model: BaseModel) -> dict[str, Any]:
    """The JSON form sent on the wire: unset optional fields (None) are left out of deltas."""
    return model.model_dump(exclude_none=True)
