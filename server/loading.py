"""What uvicorn serves from the moment the port is bound: while the model and its kernels load on a thread,
/health answers 503 {"status": "loading"} and every other path an OpenAI-shaped 503 with Retry-After (as vLLM's
and llama.cpp's servers do); then the real app, whose lifespan (the engine) starts when it is handed over.

    app = LoadingApp()
    ... uvicorn serves app ...
    app.ready(create_app(runtime))     # from the loading thread: blocks until the real app is serving
"""
from __future__ import annotations

import asyncio
import threading

from fastapi.responses import JSONResponse

from .errors import APIError

RETRY_AFTER_S = 5


class LoadingApp:
    def __init__(self) -> None:
        self.inner = None
        self._inner_lifespan = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if self.inner is not None:
            return await self.inner(scope, receive, send)
        if scope["type"] != "http":
            return
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        if scope.get("path") == "/health":
            response = JSONResponse({"status": "loading"}, status_code=503, headers=headers)
        else:
            response = APIError(503, "the model is still loading; retry shortly", headers=headers).response()
        await response(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._loop = asyncio.get_running_loop()
                self._started.set()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._inner_lifespan is not None:
                    await self._inner_lifespan.__aexit__(None, None, None)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _hand_over(self, app) -> None:
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        self._inner_lifespan = lifespan
        self.inner = app

    def ready(self, app, timeout: float = 60.0) -> None:
        """Start `app`'s lifespan on the server's event loop and route every request to it from now on."""
        if not self._started.wait(timeout):
            raise RuntimeError("the HTTP server did not start")
        asyncio.run_coroutine_threadsafe(self._hand_over(app), self._loop).result(timeout)
