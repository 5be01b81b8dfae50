"""The HTTP layer: FastAPI routes, OpenAI-style errors, API-key auth, the body-size limit, and model
loading in the background so that `/health` answers at once and `/ready` turns 200 once loaded."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from observe_r1_serve.config import RequestError, ServerConfig
from observe_r1_serve.engine import Engine
from observe_r1_serve.metrics import Metrics
from observe_r1_serve.openapi import IGNORED_HEADER, add_models, apply_limits, event_stream, ignored_header
from observe_r1_serve.protocol import (
    REFUSED,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from observe_r1_serve.serving import Started
from observe_r1_serve.serving_chat import ChatServing
from observe_r1_serve.serving_completion import CompletionServing

log = logging.getLogger("observe_r1.serve")

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
TOKENIZE_PATH = "/tokenize"  # where vLLM's server has it
COUNTED_PATHS = (CHAT_PATH, COMPLETIONS_PATH)


class Service(ChatServing, CompletionServing):
    """Both endpoints over one engine: one set of limits, one queue, one count of tokens."""


def error_response(err: RequestError) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=err.message, type=err.type, param=err.param, code=err.code))
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    return JSONResponse(body.model_dump(), status_code=err.status, headers=headers)


def _param_path(body, loc) -> str | None:
    """The request parameter an error location points at, as `messages[0].content[1].image_url.url`.

    Pydantic puts union-member labels (`str`, `list[...]`, discriminator tags) into locations; walking
    the submitted body keeps only the parts that exist in it."""
    path, node = "", body
    for i, part in enumerate(loc):
        if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path, node = f"{path}[{part}]", node[part]
        elif isinstance(node, dict) and isinstance(part, str) and (part in node or i == len(loc) - 1):
            # A key the body lacks can only be the missing field itself, at the end of the location.
            path, node = f"{path}.{part}" if path else part, node.get(part)
    return path or None


def _validation_error(exc: RequestValidationError) -> RequestError:
    errors = exc.errors()
    if errors[0].get("type") == "json_invalid":
        return RequestError(f"malformed JSON body: {errors[0].get('msg')}", code="invalid_json")
    body = exc.body if isinstance(exc.body, dict) else None
    if body is None:
        return RequestError("the request body must be a JSON object", code="invalid_json")
    located = [(_param_path(body, [p for p in e.get("loc", ()) if p != "body"]), e) for e in errors]
    param, error = max(located, key=lambda pe: len(pe[0] or ""))
    top = (param or "").split(".")[0].split("[")[0]
    if top in REFUSED and top in body:
        # A parameter this server cannot honour, given a value other than its neutral one.
        return RequestError(f"{top}: {REFUSED[top]}", param=top, code="unsupported_parameter")
    return RequestError(f"{param or 'body'}: {error.get('msg')}", param=param)


class Gate:
    """Pure ASGI middleware in front of every route: the body-size limit (by header, and while the
    body is read, without buffering past the limit), API-key auth on `/v1/*` and `/tokenize`, the request counter
    by status, and the 500 for any exception that escapes a route. Pure ASGI keeps streaming
    responses and client disconnects untouched."""

    def __init__(self, app, config: ServerConfig, metrics: Metrics):
        self.app = app
        self.config = config
        self.metrics = metrics

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.encode(), self.config.api_key.encode()
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        counted = path in COUNTED_PATHS

        async def counting_send(message):
            if counted and message["type"] == "http.response.start":
                self.metrics.requests.labels(status=str(message["status"])).inc()
            await send(message)

        headers = dict(scope["headers"])
        limit = self.config.max_body_bytes
        too_large = error_response(
            RequestError(f"request body exceeds {limit} bytes", status=413, code="body_too_large")
        )
        if (
            self.config.api_key
            and (path.startswith("/v1/") or path == TOKENIZE_PATH)
            and not self._authorized(headers)
        ):
            denied = RequestError(
                "missing or invalid API key", status=401, code="invalid_api_key", type_="authentication_error"
            )
            return await error_response(denied)(scope, receive, counting_send)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await too_large(scope, receive, counting_send)
        seen = 0
        exceeded = False
        started = False

        async def limited_receive():
            nonlocal seen, exceeded
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                # End the body here; whatever the app makes of the cut body is replaced by a 413.
                exceeded = True
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if not exceeded:
                started = True
                await counting_send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if started:
                raise  # the response is under way: nothing can replace it
            if not exceeded:
                # Answered here, not by Starlette's ServerErrorMiddleware: it re-raises after its 500,
                # and uvicorn then closes the connection, failing the client's next pooled request.
                log.exception("unhandled error on %s", path)
                internal = RequestError("internal server error", status=500, type_="server_error")
                return await error_response(internal)(scope, receive, counting_send)
        if exceeded:
            await too_large(scope, receive, counting_send)


def create_app(
    config: ServerConfig,
    engine_factory: Callable[[ServerConfig], Engine],
    on_load_failure: Callable[[], None] | None = None,
) -> FastAPI:
    metrics = Metrics()
    state: dict = {"engine": None, "service": None, "load_error": None}

    async def load() -> None:
        try:
            engine = await asyncio.to_thread(engine_factory, config)
        except Exception as e:  # reported on /ready, in the log, and to `on_load_failure`
            log.exception("loading the model from %s failed", config.model)
            state["load_error"] = f"{type(e).__name__}: {e}"
            if on_load_failure is not None:
                on_load_failure()
            return
        state["engine"] = engine
        state["service"] = Service(config, engine, metrics)
        log.info("model %s ready (%s engine)", config.model_name, engine.name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(load())
        yield
        await task
        if state["engine"] is not None:
            await state["engine"].shutdown()

    app = FastAPI(title="Observe-R1 chat completions", version="0.1.0", lifespan=lifespan)
    app.state.server = state

    def openapi() -> dict:
        """The document with the running server's limits (observe_r1_serve.openapi), kept once the
        model, whose vocabulary it names, is loaded."""
        if app.openapi_schema is not None:
            return app.openapi_schema
        engine = state["engine"]
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        add_models(document, ChatCompletionChunk)
        apply_limits(document, config, engine.vocab_size if engine else None)
        if engine is not None:
            app.openapi_schema = document
        return document

    app.openapi = openapi

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        response = error_response(RequestError(str(exc.detail), status=exc.status_code, code=code))
        response.headers.update(exc.headers or {})  # a 405's Allow header (RFC 9110)
        return response

    app.add_middleware(Gate, config=config, metrics=metrics)

    def service() -> Service:
        if state["service"] is None:
            detail = state["load_error"] or "the model is still loading"
            raise RequestError(
                detail, status=503, code="model_not_ready", type_="server_error", retry_after=5
            )
        return state["service"]

    @app.get("/health", summary="Liveness: the process answers")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: the model is loaded", responses={503: {"model": ErrorResponse}})
    async def ready():
        service()
        return {"status": "ready", "model": config.model_name, "engine": state["engine"].name}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus():
        engine = state["engine"]
        return PlainTextResponse(
            metrics.render(engine.stats if engine else None), media_type="text/plain; version=0.0.4"
        )

    @app.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
    async def models():
        return ModelList(data=[ModelCard(id=config.model_name)])

    errors = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}

    def streamed(title: str, chunk: str) -> dict:
        return {
            200: {
                "description": f"the {title}; with `stream`, server-sent events of its chunks",
                "content": event_stream(chunk),
                "headers": {
                    IGNORED_HEADER: {
                        "description": "request fields that are no parameter of the endpoint, ignored "
                        "(percent-encoded, comma-separated)",
                        "schema": {"type": "string"},
                    }
                },
            },
            **errors,
        }

    def events(started: Started, stream) -> StreamingResponse:
        return StreamingResponse(
            stream,
            media_type="text/event-stream",
            headers={
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                **ignored_header(started.ignored),
            },
        )

    @app.post(
        CHAT_PATH,
        response_model=ChatCompletionResponse,
        response_model_exclude_none=True,
        responses=streamed("chat completion", "ChatCompletionChunk"),
    )
    async def chat_completions(body: ChatCompletionRequest, response: Response):
        arrival = time.monotonic()
        svc = service()
        started = await svc.start_chat(body)
        if body.stream:
            return events(started, svc.stream_chat(body, started, arrival))
        response.headers.update(ignored_header(started.ignored))
        return await svc.complete_chat(body, started, arrival)

    @app.post(TOKENIZE_PATH, response_model=TokenizeResponse, responses=errors)
    async def tokenize(body: TokenizeRequest):
        return service().tokenize(body)

    @app.post(
        COMPLETIONS_PATH,
        response_model=CompletionResponse,
        response_model_exclude_none=True,
        responses=streamed("completion", "CompletionResponse"),
    )
    async def completions(body: CompletionRequest, response: Response):
        arrival = time.monotonic()
        svc = service()
        started = await svc.start_completion(body)
        if body.stream:
            return events(started, svc.stream_text(body, started, arrival))
        response.headers.update(ignored_header(started.ignored))
        return await svc.complete_text(body, started, arrival)

    return app


def build_engine(config: ServerConfig) -> Engine:
    """The engine `config.engine` names; "auto" picks vLLM where it is installed and a GPU is present."""
    name = config.engine
    if name == "auto":
        name = "vllm" if _vllm_usable() else "transformers"
    if name == "vllm":
        from observe_r1_serve.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    from observe_r1_serve.transformers_engine import TransformersEngine

    return TransformersEngine(config)


def _vllm_usable() -> bool:
    import importlib.util

    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
