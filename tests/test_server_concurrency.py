"""Continuous batching under load: concurrent requests, disconnects, a full queue."""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

PROMPTS = ["Once upon a time", "The cat", "Lily and Tom went", "One day", "She saw a big", "He was very",
           "The sun was", "A little dog", "They played", "Mom said", "The tree", "It was a",
           "The girl liked", "Ben had a", "In the park", "The bird"]


def gauge(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_sixteen_concurrent_requests_match_single_runs(tiny_server):
    client = tiny_server.client()
    args = dict(model="tiny", max_tokens=20, temperature=0)
    alone = [client.completions.create(prompt=p, **args).choices[0] for p in PROMPTS]

    async def together():
        aclient = tiny_server.async_client()
        return await asyncio.gather(*(aclient.completions.create(prompt=p, **args) for p in PROMPTS))

    engine = tiny_server.runtime.engine
    runner, deliver = engine.runner, engine._deliver
    batch_sizes, delivered = [], []
    runner.decode = lambda slots, *rest: batch_sizes.append(len(slots)) or type(runner).decode(runner, slots, *rest)
    engine._deliver = lambda items: delivered.append(len(items)) or deliver(items)
    try:
        outs = asyncio.run(together())
    finally:
        del runner.decode
        engine._deliver = deliver
    for ref, out in zip(alone, outs):
        assert (out.choices[0].text, out.choices[0].finish_reason) == (ref.text, ref.finish_reason)
    assert max(batch_sizes) > 1  # they really were decoded together
    assert max(delivered) > 1  # and a step's outputs were handed over together, once the step was done


def test_disconnect_mid_stream_frees_the_slot(tiny_server):
    before = _finished(tiny_server, "abort")
    stream = tiny_server.client().completions.create(model="tiny", prompt="Once", max_tokens=2000, stream=True,
                                                     extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream):
        pass
    assert gauge(tiny_server, "mamp:num_requests_running") == 1
    stream.close()
    wait_for(lambda: gauge(tiny_server, "mamp:num_requests_running") == 0)
    wait_for(lambda: _finished(tiny_server, "abort") == before + 1)
    assert gauge(tiny_server, "mamp:kv_cache_usage_bytes") == 0


def test_disconnect_while_waiting_for_a_full_response_frees_the_slot(tiny_server):
    before = _finished(tiny_server, "abort")
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny_server.url + "/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=0.3))
    wait_for(lambda: _finished(tiny_server, "abort") == before + 1)
    assert gauge(tiny_server, "mamp:num_requests_running") == 0


def _finished(server, reason: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mamp:requests_finished_total" and sample.labels["finish_reason"] == reason:
                return sample.value
    return 0.0


def test_full_queue_answers_429(start_server, tiny_llama_dir):
    server = start_server(model=str(tiny_llama_dir), served_model_name="tiny", max_num_seqs=1, max_queue=1)
    client = server.client()
    long = dict(model="tiny", prompt="Once", max_tokens=2000, stream=True, extra_body={"ignore_eos": True})
    running = client.completions.create(**long)
    next(iter(running))
    waiting = client.completions.create(**long)  # accepted: one place in the queue
    wait_for(lambda: gauge(server, "mamp:num_requests_waiting") == 1)
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model="tiny", prompt="Once", max_tokens=2)
    assert info.value.status_code == 429 and info.value.body["type"] == "rate_limit_error"
    assert info.value.response.headers["retry-after"] == "1"
    running.close()
    first = next(iter(waiting))  # the waiting request moves into the freed slot
    assert first.choices[0].text is not None
    waiting.close()
    wait_for(lambda: gauge(server, "mamp:num_requests_running") == 0)
    out = client.completions.create(model="tiny", prompt="Once", max_tokens=2, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 2


def test_chunked_prefill_gives_the_same_text_and_keeps_streams_moving(start_server, tiny_llama_dir, tiny_server):
    """With a prefill budget of 8 tokens per step a long prompt is prefilled over several steps, decode steps of
    the running stream happen in between, and every text equals the unchunked server's."""
    chunked = start_server(model=str(tiny_llama_dir), served_model_name="tiny", max_prefill_tokens=8)
    long_prompt = " ".join(PROMPTS * 3)
    args = dict(model="tiny", max_tokens=12, temperature=0)
    refs = [tiny_server.client().completions.create(prompt=p, **args).choices[0].text
            for p in (long_prompt, PROMPTS[0])]
    runner = chunked.runtime.engine.runner
    calls = []
    runner.prefill = lambda slot, ids, *a, **kw: calls.append(("prefill", len(ids))) or \
        type(runner).prefill(runner, slot, ids, *a, **kw)
    runner.decode = lambda slots, *rest: calls.append(("decode", len(slots))) or \
        type(runner).decode(runner, slots, *rest)

    async def both():
        client = chunked.async_client()
        short = asyncio.create_task(client.completions.create(prompt=PROMPTS[0], **{**args, "max_tokens": 400},
                                                              extra_body={"ignore_eos": True}))
        while not any(k == "decode" for k, _ in calls):  # the short request is decoding when the long one arrives
            await asyncio.sleep(0.001)
        return await asyncio.gather(client.completions.create(prompt=long_prompt, **args), short)

    try:
        long_out, short_out = asyncio.run(both())
    finally:
        del runner.prefill, runner.decode
    assert long_out.choices[0].text == refs[0]
    assert short_out.choices[0].text.startswith(refs[1])
    chunks = [i for i, (kind, n) in enumerate(calls) if kind == "prefill" and n == 8]
    assert all(n <= 8 for kind, n in calls if kind == "prefill")
    assert len(chunks) >= 4  # the long prompt went in chunks of the budget
    # Between any two chunks of the long prompt the short stream decoded: it never waited for the whole prefill.
    for a, b in zip(chunks, chunks[1:]):
        assert any(kind == "decode" for kind, _ in calls[a + 1:b]), calls[a:b + 1]


def test_engine_runs_big_steps_on_more_threads(start_server, tiny_llama_dir):
    """threads=1, threads_batch=2: decode batches and prefill chunks of Engine.BATCH_ROWS rows or more run on 2
    torch threads, smaller ones on 1 (set by the engine thread before each step)."""
    import torch

    from mamp.server.engine import Engine

    server = start_server(model=str(tiny_llama_dir), served_model_name="tiny", threads=1, threads_batch=2)
    runner = server.runtime.engine.runner
    calls = []
    runner.prefill = lambda slot, ids, *a, **kw: calls.append((len(ids), torch.get_num_threads())) or \
        type(runner).prefill(runner, slot, ids, *a, **kw)
    runner.decode = lambda slots, *rest: calls.append((len(slots), torch.get_num_threads())) or \
        type(runner).decode(runner, slots, *rest)

    async def many():
        client = server.async_client()
        return await asyncio.gather(*(client.completions.create(model="tiny", prompt=p, max_tokens=6,
                                                                extra_body={"ignore_eos": True})
                                      for p in [PROMPTS[0], " ".join(PROMPTS * 2)] * 5))

    try:
        asyncio.run(many())
    finally:
        del runner.prefill, runner.decode
    assert runner.head_threads == 2  # the lm_head: one large call, all threads whatever the batch
    assert {rows >= Engine.BATCH_ROWS for rows, _ in calls} == {True, False}
    assert all(threads == (2 if rows >= Engine.BATCH_ROWS else 1) for rows, threads in calls), calls
