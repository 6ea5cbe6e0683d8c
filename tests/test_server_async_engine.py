"""The asyncio bridge: a step's outputs reach their event loop with one wake-up, in order."""
from __future__ import annotations

import asyncio
import threading

from mamp.server.async_engine import RequestStream, deliver
from mamp.server.engine import SeqOutput
from mamp.server.sampling import SampledToken, SamplingParams


class _Engine:
    """Takes sequences and hands back ids, as Engine.submit does; keeps the sinks."""

    def __init__(self):
        self.sinks = []

    def submit(self, prompts, params, sinks):
        self.sinks += sinks
        return list(range(len(self.sinks) - len(sinks), len(self.sinks)))

    def abort(self, seq_ids):
        pass


def test_a_steps_outputs_wake_the_loop_once_and_arrive_in_order():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    wakes = []
    real = loop.call_soon_threadsafe
    try:
        engine = _Engine()
        params = SamplingParams(max_tokens=3)
        # 16 one-sequence requests and one two-sequence request, all read by coroutines on the loop
        streams = [RequestStream(engine, [[1]], [params], loop) for _ in range(16)]
        streams.append(RequestStream(engine, [[1], [2]], [params, params], loop))
        assert len(engine.sinks) == 18

        async def read(stream):
            return [(i, out.token.token_id if out.token else None, out.finish_reason) async for i, out in stream]

        futures = [asyncio.run_coroutine_threadsafe(read(s), loop) for s in streams]

        def wake_and_wait(fn, *args):  # the loop runs each wake-up before the poster goes on: nothing coalesces
            done = threading.Event()   # by timing, so the count is that of the posts
            wakes.append(fn)
            real(lambda: (fn(*args), done.set()))
            assert done.wait(10)

        loop.call_soon_threadsafe = wake_and_wait
        for step in range(3):  # three engine steps, from this thread as from the engine's
            reason = "length" if step == 2 else None
            deliver([(sink, SeqOutput(SampledToken(100 * step + j), "x", reason))
                     for j, sink in enumerate(engine.sinks)])
        results = [f.result(timeout=10) for f in futures]
        assert len(wakes) == 3  # one per step
        for j, got in enumerate(results[:16]):
            assert got == [(0, j, None), (0, 100 + j, None), (0, 200 + j, "length")]
        assert results[16] == [(0, 16, None), (1, 17, None), (0, 116, None), (1, 117, None),
                               (0, 216, "length"), (1, 217, "length")]
    finally:
        real(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_delivery_to_a_closed_loop_is_dropped_and_other_sinks_still_get_theirs():
    closed = asyncio.new_event_loop()
    engine = _Engine()
    RequestStream(engine, [[1]], [SamplingParams()], closed)
    closed.close()
    got = []
    out = SeqOutput(SampledToken(5), "x", "stop")
    deliver([(engine.sinks[0], out), (got.append, out)])  # no exception for the closed loop's consumer
    assert got == [out]


def test_a_failing_hand_over_does_not_lose_the_others():
    from mamp.server.async_engine import _Mailbox

    loop = asyncio.new_event_loop()
    try:
        got = []

        def boom(_):
            raise ValueError("a consumer's queue is broken")

        _Mailbox.of(loop).post_many([(got.append, (1,)), (boom, (2,)), (got.append, (3,))])
        loop.run_until_complete(asyncio.sleep(0.05))
        assert got == [1, 3]
    finally:
        loop.close()
