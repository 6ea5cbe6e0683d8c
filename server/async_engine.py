"""asyncio side of the engine: submit a request's sequences, then iterate their outputs; deliver, the engine's
hand-over of a step's outputs to the event loops that wait for them."""
from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from typing import AsyncIterator, Callable

from .engine import Engine, SeqOutput, Sink, deliver_each
from .sampling import SamplingParams

logger = logging.getLogger(__name__)


class _Mailbox:
    """Hands calls from the engine thread to one event loop, waking the loop once per batch.

    A decode step emits one output per running stream. Waking the loop for each (call_soon_threadsafe: a write to
    its self-pipe, after which the woken loop takes the GIL and the engine thread waits for it back) cost the
    engine thread ~160 us per stream at 16 streams, 1.2 of its 2.4 ms of Python per step. post_many wakes the loop
    once for a whole step; calls posted while a wake-up is pending go with it, in order."""

    _boxes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox]" = weakref.WeakKeyDictionary()
    _boxes_lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[Callable, tuple]] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "_Mailbox":
        with cls._boxes_lock:
            box = cls._boxes.get(loop)
            if box is None:
                box = cls._boxes[loop] = cls(loop)
            return box

    def post_many(self, calls: list[tuple[Callable, tuple]]) -> None:
        """Runs each fn(*args) on the loop, in order (any thread may call; RuntimeError once the loop is closed)."""
        with self._lock:
            wake = not self._pending
            self._pending.extend(calls)
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nothing will drain, so hold nothing
                with self._lock:
                    self._pending.clear()
                raise

    def _drain(self) -> None:
        with self._lock:
            calls, self._pending = self._pending, []
        for fn, args in calls:
            try:
                fn(*args)
            except Exception:  # one consumer's failure must not lose the others' outputs
                logger.exception("handing an output to its stream failed")


class _LoopSink:
    """A sequence's sink: its outputs go to a queue that a coroutine on `box`'s loop reads."""
    __slots__ = ("box", "queue", "index")

    def __init__(self, box: _Mailbox, queue: asyncio.Queue, index: int):
        self.box, self.queue, self.index = box, queue, index

    def call(self, out: SeqOutput) -> tuple[Callable, tuple]:
        """What puts `out` on the stream's queue, as the mailbox runs it on the loop."""
        return self.queue.put_nowait, ((self.index, out),)

    def __call__(self, out: SeqOutput) -> None:
        self.box.post_many([self.call(out)])


def deliver(items: list[tuple[Sink, SeqOutput]]) -> None:
    """The engine's delivery of a step's outputs (Engine(deliver=...)): one wake-up per event loop, the outputs in
    the order made; other sinks are called as they are."""
    boxes: dict[_Mailbox, list[tuple[Callable, tuple]]] = {}
    others: list[tuple[Sink, SeqOutput]] = []
    for sink, out in items:
        if isinstance(sink, _LoopSink):
            boxes.setdefault(sink.box, []).append(sink.call(out))
        else:
            others.append((sink, out))
    for box, calls in boxes.items():
        try:
            box.post_many(calls)
        except RuntimeError:  # the loop is closed: its consumers are gone, their sequences aborted separately
            pass
    deliver_each(others)


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
        box = _Mailbox.of(loop or asyncio.get_running_loop())
        sinks = [_LoopSink(box, self._queue, i) for i in range(len(prompts))]
        self._seq_ids = engine.submit(prompts, params, sinks)   # raises QueueFullError
        self._pending = len(prompts)

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
