"""The OpenAPI document as this server runs: FastAPI's, with the limits only the running server knows.

FastAPI derives the document from the pydantic models, which know neither the server's options (`n`
up to `--max-n`, tokens up to `--max-completion-tokens`, whether unknown fields are refused) nor the
model's vocabulary (the token ids a prompt or `logit_bias` may name). Without them the document
would promise that requests the server refuses are valid; schemathesis checks that it does not
(tests/test_serve_openapi.py). FastAPI's 422 is gone too: validation errors are 400 in OpenAI's shape.

What no schema can say is answered 400 naming the parameter, and the descriptions say so: an image
that does not decode or breaks the image limits, a prompt past `--max-prompt-tokens`, more images
than `--max-images-per-request`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from pydantic import BaseModel

from observe_r1_serve.config import ServerConfig

IGNORED_HEADER = "X-Observe-R1-Ignored-Params"


def ignored_header(names: list[str]) -> dict[str, str]:
    """The header naming ignored fields, each percent-encoded (a field name may be any Unicode
    string, a header value only Latin-1)."""
    return {IGNORED_HEADER: ", ".join(quote(name, safe="") for name in names)} if names else {}


def event_stream(chunk: str) -> dict[str, Any]:
    """The `text/event-stream` content of a streamed answer: each event's data is a `chunk` (JSON),
    an error in OpenAI's shape (a failure after the stream began), or the closing `[DONE]`. As
    OpenAPI 3.1 reads it, the schema of an event stream describes one event."""
    data = {
        "anyOf": [
            {"const": "[DONE]"},
            {
                "contentMediaType": "application/json",
                "contentSchema": {
                    "anyOf": [
                        {"$ref": f"#/components/schemas/{chunk}"},
                        {"$ref": "#/components/schemas/ErrorResponse"},
                    ]
                },
            },
        ]
    }
    schema = {"type": "object", "properties": {"data": data}, "required": ["data"]}
    return {"text/event-stream": {"schema": schema}}


def add_models(document: dict[str, Any], *models: type[BaseModel]) -> dict[str, Any]:
    """`document` with the schemas of `models` (and of the models they use) in its components: the
    chunks of a stream appear in no route's response model, so FastAPI leaves them out, but the event
    stream's schema refers to them."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in {**schema.pop("$defs", {}), model.__name__: schema}.items():
            schemas.setdefault(name, definition)
    return document


def at_most_pattern(limit: int) -> str:
    """A regular expression for the decimal numbers 0 .. `limit` (no leading zeros), for JSON
    Schema's `propertyNames`, where keys are strings."""
    digits = str(limit)
    width = len(digits)
    alternatives = ["0"]
    if width > 1:
        alternatives.append(f"[1-9][0-9]{{0,{width - 2}}}")  # every shorter number
    for i, digit in enumerate(digits):  # same width: equal up to position i, then a smaller digit
        low, high = (1 if i == 0 else 0), int(digit) - 1
        if high >= low:
            rest = width - i - 1
            alternatives.append(digits[:i] + f"[{low}-{high}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    alternatives.append(digits)
    return "^(" + "|".join(dict.fromkeys(alternatives)) + ")$"


def _integer_branches(schema: dict) -> list[dict]:
    """The integer schemas in `schema`, itself or inside anyOf/items, at any depth."""
    found = [schema] if schema.get("type") == "integer" else []
    for branch in schema.get("anyOf", []):
        found += _integer_branches(branch)
    if isinstance(schema.get("items"), dict):
        found += _integer_branches(schema["items"])
    return found


def _bound(schema: dict, maximum: int) -> None:
    for branch in _integer_branches(schema):
        branch["maximum"] = maximum


def apply_limits(document: dict[str, Any], config: ServerConfig, vocab_size: int | None) -> dict[str, Any]:
    """`document` (FastAPI's, changed in place) with the server's limits and, once the model is
    loaded, its vocabulary; returned for chaining."""
    schemas = document["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = schemas[name]["properties"]
        props["model"]["enum"] = [config.model_name]  # any other name is a 404
        _bound(props["n"], config.max_n)
        for tokens in ("max_tokens", "max_completion_tokens"):
            if tokens in props:
                _bound(props[tokens], config.max_completion_tokens)
        if config.reject_unknown_params:
            schemas[name]["additionalProperties"] = False
        if vocab_size is not None:
            bias = next(b for b in props["logit_bias"]["anyOf"] if b.get("type") == "object")
            bias["propertyNames"] = {"pattern": at_most_pattern(vocab_size - 1)}
    if vocab_size is not None:
        _bound(schemas["CompletionRequest"]["properties"]["prompt"], vocab_size - 1)
    # A number of top_logprobs only with logprobs true, as OpenAI has it.
    schemas["ChatCompletionRequest"]["if"] = {
        "properties": {"top_logprobs": {"type": "integer"}},
        "required": ["top_logprobs"],
    }
    schemas["ChatCompletionRequest"]["then"] = {
        "properties": {"logprobs": {"const": True}},
        "required": ["logprobs"],
    }
    for path in document["paths"].values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return document
