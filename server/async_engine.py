"""asyncio side of the engine: submit a request's sequences, then iterate their outputs."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from .engine import Engine, SeqOutput
from .sampling import SamplingParams


class RequestStream:
    """Outputs of one request's sequences as (index, SeqOutput), in the order the engine made them.

    Iterate it inside try/finally and call abort() in the finally: when the consumer is cancelled (a client
    disconnected) the engine frees the slots at its next step.
    """

    def __init__(self, engine: Engine, prompts: list[list[int]], params: list[SamplingParams],
                 loop: asyncio.AbstractEventLoop | None = None):
        """loop: the event loop that will iterate the stream (default: the running one; give it when submitting
        from a worker thread)."""
        self._engine = engine
        self._queue: asyncio.Queue[tuple[int, SeqOutput]] = asyncio.Queue()
        loop = loop or asyncio.get_running_loop()
        sinks = [self._sink(loop, i) for i in range(len(prompts))]
        self._seq_ids = engine.submit(prompts, params, sinks)   # raises QueueFullError
        self._pending = len(prompts)

    def _sink(self, loop: asyncio.AbstractEventLoop, index: int):
        def put(out: SeqOutput) -> None:
            loop.call_soon_threadsafe(self._queue.put_nowait, (index, out))
        return put

    async def __aiter__(self) -> AsyncIterator[tuple[int, SeqOutput]]:
        while self._pending:
            index, out = await self._queue.get()
            if out.finish_reason is not None:
                self._pending -= 1
            yield index, out

    def abort(self) -> None:
        """Cancels whatever has not finished; harmless after the end."""
        if self._pending:
            self._engine.abort(self._seq_ids)
