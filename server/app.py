"""The FastAPI app: thin routes over the completion and chat services, auth, OpenAI-shaped errors."""
from __future__ import annotations

import asyncio
import hmac
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Awaitable, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import APIError, queue_full, too_large, unauthorized, validation_error
from .metrics import CONTENT_TYPE
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                       ErrorResponse, ModelCard, ModelList)
from .runtime import Runtime

logger = logging.getLogger(__name__)
T = TypeVar("T")


class _ClientGone(Exception):
    pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it if the client hangs up first (its finally blocks free the slots)."""
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise _ClientGone()
    return task.result()


class ApiKeyCheck:
    """ASGI middleware: /v1/* requires `Authorization: Bearer KEY` (/health and /metrics stay open). Checked
    before the body is read or parsed, so a client without the key learns nothing but 401."""

    def __init__(self, app, api_key: str, on_refused=None) -> None:
        self.app, self.key, self.on_refused = app, api_key.encode(), on_refused

    async def __call__(self, scope, receive, send):
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # route on the path below a --root-path, as Starlette does
            path = path[len(root):]
        if scope["type"] == "http" and (path == "/v1" or path.startswith("/v1/")):
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, key = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.key):
                if self.on_refused:
                    self.on_refused()
                return await unauthorized().response()(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over max_bytes gets an OpenAI-shaped 413 before the app sees it: at once
    by its Content-Length, or, for a body without one (chunked), once the bytes received pass the limit (such a
    body is buffered here, at most max_bytes, and replayed to the app)."""

    def __init__(self, app, max_bytes: int, on_refused=None) -> None:
        self.app, self.max_bytes, self.on_refused = app, max_bytes, on_refused

    async def _refuse(self, scope, receive, send):
        if self.on_refused:
            self.on_refused()
        await too_large(self.max_bytes).response()(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.max_bytes <= 0:
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                return await self._refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(runtime: Runtime) -> FastAPI:
    """`runtime` holds the loaded model, engine, services and metrics; the app starts and stops its engine."""
    config, metrics = runtime.config, runtime.metrics

    # Templating and tokenizing a request (a long prompt takes seconds) runs on one worker thread, never on the
    # event loop: /health and every stream keep going meanwhile. One thread: requests are prepared in order and
    # never encode concurrently with each other (the engine thread still decodes meanwhile, as before). Requests
    # waiting for it count against the queue limit, so a flood gets 429s rather than piling up in memory.
    prepare_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mamp-prepare")
    preparing = 0

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.engine.start()
        try:
            yield
        finally:  # no request is prepared into a stopped engine: the pool first
            prepare_pool.shutdown(wait=True, cancel_futures=True)
            runtime.engine.shutdown()

    app = FastAPI(title="mamp", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes,
                       on_refused=lambda: metrics.record_failure(413))
    if config.api_key:  # added last: runs first, so a request without the key is refused before anything else
        app.add_middleware(ApiKeyCheck, api_key=config.api_key, on_refused=lambda: metrics.record_failure(401))

    async def start_job(service, body):
        nonlocal preparing
        if preparing >= config.max_queue + config.max_num_seqs:
            raise queue_full(f"the server is busy: {preparing} requests are being prepared; retry later")
        loop = asyncio.get_running_loop()
        preparing += 1
        try:
            return await loop.run_in_executor(prepare_pool, service.start, body, loop)
        finally:
            preparing -= 1

    def fail(err: APIError) -> JSONResponse:
        metrics.record_failure(err.status)
        return err.response()

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return fail(exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        return fail(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return fail(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(_ClientGone)
    async def on_client_gone(request: Request, exc: _ClientGone):
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return fail(APIError(500, "internal server error"))

    v1 = APIRouter(prefix="/v1")  # the API key is checked by ApiKeyCheck, before the body is read

    @app.get("/health", responses={200: {"content": {"application/json": {"schema": {
        "type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"]}}}}})
    async def health():
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response, responses={200: {
        "description": "Prometheus text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics_endpoint():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @v1.get("/models", responses=_errors(401))
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=runtime.model_name, root=runtime.info.path,
                                         max_model_len=runtime.max_model_len)])

    @v1.post("/completions", response_model=None, responses=_generation_responses(CompletionResponse))
    async def completions(body: CompletionRequest, request: Request):
        job = await start_job(runtime.completions, body)
        if body.stream:
            return StreamingResponse(runtime.completions.stream(job), media_type="text/event-stream")
        return await _unless_disconnected(request, runtime.completions.respond(job))

    @v1.post("/chat/completions", response_model=None, responses=_generation_responses(ChatCompletionResponse))
    async def chat(body: ChatCompletionRequest, request: Request):
        job = await start_job(runtime.chat, body)
        if body.stream:
            return StreamingResponse(runtime.chat.stream(job), media_type="text/event-stream")
        return await _unless_disconnected(request, runtime.chat.respond(job))

    app.include_router(v1)
    app.openapi = lambda: _openapi(app)
    return app


_ERROR_DESCRIPTIONS = {400: "invalid request (any validation failure; never 422)", 401: "missing or wrong API key",
                       404: "unknown model", 413: "request body too large", 429: "queue full (Retry-After)",
                       500: "generation failed"}


def _errors(*codes: int) -> dict:
    return {code: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[code]} for code in codes}


def _generation_responses(model) -> dict:
    """200: the JSON response, or with "stream": true server-sent events (text/event-stream); the errors."""
    return {200: {"model": model, "description": "the completion, or its stream of events when stream is true",
                  "content": {"text/event-stream": {"schema": {  # one server-sent event: data is a JSON chunk,
                      "type": "object", "properties": {  # or [DONE] at the end
                          "data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
                      "required": ["data"]}}}},
            **_errors(400, 401, 404, 413, 429, 500)}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, corrected to what the server does: validation errors are 400 (OpenAI's code), not
    FastAPI's 422, in the OpenAI error shape."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in doc.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            doc.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = doc
    return app.openapi_schema
