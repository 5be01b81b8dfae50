"""The OpenAI chat-completions schema as this server speaks it, plus the Observe-R1 fields.

Requests follow OpenAI's `POST /v1/chat/completions`. Responses add, on each message and delta:
`observation` (the observe block), `reasoning` (the think block, also as `reasoning_content`, the
older vLLM name), `format_ok`/`format_errors` on each choice, and `raw` when `return_raw_text` is set.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    """Request parts are validated strictly: "yes" is not a boolean and "2" is not a number."""

    model_config = ConfigDict(strict=True)


class ImageURL(_Request):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    """The request body. Unknown OpenAI parameters (e.g. `user`, `logit_bias`) are accepted and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = Field(default=1, ge=1)
    # Sampling settings left out (None) take the model's generation-config defaults (`--generation-config`).
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, description="vLLM's extra: 0 or -1 for no top-k cut")
    repetition_penalty: float | None = Field(default=None, gt=0.0, description="vLLM's extra: 1 for none")
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_raw_text: bool = Field(default=False, description="also return the model's raw text as `raw`")


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0
    observation_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails


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


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[StreamChoice]
    usage: Usage | None = None


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
