"""The engine and server over the paged, quantized KV cache: preemption when the pool is full (every sequence
still finishes, with the text it would have had alone), blocks freed on finish and abort, 16 concurrent clients
with an int8 cache, the KV series in /metrics, and a pool too small for one sequence refused at start-up."""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM, AutoTokenizer

from mamp.server.batched_llama import BatchedLlama
from mamp.server.config import ServerConfig, parse_bytes
from mamp.server.engine import Engine
from mamp.server.runtime import build_runtime
from mamp.server.sampling import SamplingParams

PROMPTS = ["Once upon a time", "The cat", "Lily and Tom went", "One day", "She saw a big", "He was very",
           "The sun was", "A little dog", "They played", "Mom said", "The tree", "It was a",
           "The girl liked", "Ben had a", "In the park", "The bird"]


def run_engine(model, tok, prompts: list[str], blocks: int, rows: int = 4, max_tokens: int = 40, kind="auto",
               block_size: int = 16, **engine_args):
    """Greedy completions through a real Engine thread; returns (token ids per prompt, engine)."""
    runner = BatchedLlama(model, rows, 128, kv_cache_dtype=kind, kv_cache_blocks=blocks, kv_block_size=block_size)
    engine = Engine(runner, tok, rows, max_queue=64, max_prefill_tokens=8, **engine_args)
    done = threading.Semaphore(0)
    outs: list[list] = [[] for _ in prompts]

    def sink(i):
        def put(out):
            outs[i].append(out)
            if out.finish_reason is not None:
                done.release()
        return put

    engine.start()
    try:
        ids = [tok(p).input_ids for p in prompts]
        params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)] * len(prompts)
        engine.submit(ids, params, [sink(i) for i in range(len(prompts))])
        for _ in prompts:
            assert done.acquire(timeout=120), "a sequence did not finish"
    finally:
        engine.shutdown()
    for o in outs:
        assert o[-1].finish_reason == "length", o[-1]
    return [[x.token.token_id for x in o if x.token is not None] for o in outs], engine


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_a_full_pool_preempts_and_every_sequence_still_finishes_as_alone(tiny):
    model, tok = tiny
    prompts = PROMPTS[:6]
    roomy, engine = run_engine(model, tok, prompts, blocks=64)
    assert engine.num_preemptions == 0
    # 6 sequences of up to ~48 tokens (3 blocks each) in 9 blocks, 4 rows: they must take turns and be preempted
    tight, engine = run_engine(model, tok, prompts, blocks=9)
    assert engine.num_preemptions > 0
    assert tight == roomy  # recomputed sequences go on exactly where they stopped
    cache = engine.runner.cache
    assert cache.allocator.num_used == 0 and cache.allocator.num_free == 9  # everything freed


def test_prompts_wait_for_blocks_rather_than_fail(tiny):
    """Two prompts that each need most of the pool, submitted together: the second waits for the first's blocks
    (admission counts the blocks it has already promised in the same step), and a prompt whose first decode
    position opens a new block gets that block with its prompt (no self-preemption loop)."""
    model, tok = tiny
    prompts = [" ".join(["Once upon a time"] * 8), " ".join(["The cat sat"] * 8)]
    lengths = [len(tok(p).input_ids) for p in prompts]
    assert all(33 <= n <= 48 for n in lengths), lengths  # 3 blocks with the first decode position
    roomy, _ = run_engine(model, tok, prompts, blocks=16, rows=2, max_tokens=8)
    tight, engine = run_engine(model, tok, prompts, blocks=4, rows=2, max_tokens=8)
    assert tight == roomy and engine.num_preemptions == 0


@pytest.mark.parametrize("kind", ["auto", "int8"])
def test_the_block_size_does_not_change_the_text(tiny, kind):
    """Blocks of 16 or 64 tokens (1 and 5 as awkward extremes) hold the same entries: the same greedy tokens."""
    model, tok = tiny
    ref, _ = run_engine(model, tok, PROMPTS[:3], blocks=64, max_tokens=24, kind=kind)
    for bs, blocks in ((64, 16), (1, 1024), (5, 200)):
        out, engine = run_engine(model, tok, PROMPTS[:3], blocks=blocks, max_tokens=24, kind=kind, block_size=bs)
        assert out == ref and engine.runner.cache.block_size == bs


def test_int8_cache_decodes_close_to_the_float_cache(tiny):
    """The quantized cache through the whole engine: most greedy tokens agree with the fp32 cache's."""
    model, tok = tiny
    ref, _ = run_engine(model, tok, PROMPTS[:4], blocks=64, max_tokens=16)
    q8, _ = run_engine(model, tok, PROMPTS[:4], blocks=64, max_tokens=16, kind="int8")
    same = sum(a == b for r, q in zip(ref, q8) for a, b in zip(r, q))
    assert same >= 0.9 * sum(map(len, ref)), (same, ref, q8)


def test_sixteen_clients_with_an_int8_cache_all_complete_and_the_series_show_it(start_server, tiny_llama_dir):
    server = start_server(model=str(tiny_llama_dir), served_model_name="tiny-kv8", kv_cache_dtype="int8",
                          kv_cache_memory=parse_bytes("1MiB"), max_model_len=256)

    async def together():
        client = server.async_client()
        return await asyncio.gather(*(client.completions.create(model="tiny-kv8", prompt=p, max_tokens=24,
                                                                temperature=0, extra_body={"ignore_eos": True})
                                      for p in PROMPTS))

    outs = asyncio.run(together())
    assert all(o.choices[0].finish_reason == "length" and o.usage.completion_tokens == 24 for o in outs)
    text = httpx.get(server.url + "/metrics").text
    m = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    # 2 layers x 2 KV heads of 16 x (16 + 2) bytes x (k, v) per token, against 2 x 2 x 32 x 2 in 16 bits
    cache = server.runtime.engine.runner.cache
    assert cache.bytes_per_token == 144 and cache.num_blocks == (1 << 20) // (16 * 144)
    assert m["mamp:kv_cache_capacity_bytes"] == cache.num_blocks * 16 * 144
    assert m["mamp:kv_cache_capacity_16bit_bytes"] == cache.num_blocks * 16 * 256
    assert m["mamp:kv_cache_saving_ratio"] == pytest.approx(1 - 144 / 256)
    assert m["mamp:kv_cache_usage_bytes"] == 0 and m["mamp:kv_cache_blocks_used"] == 0  # all finished
    assert m["mamp:kv_cache_blocks_free"] == cache.num_blocks
    assert "mamp:num_preemptions_total" in m


def test_a_pool_too_small_for_one_sequence_is_a_start_up_error(tiny_llama_dir):
    with pytest.raises(ValueError, match="fewer than one sequence of --max-model-len 512"):
        build_runtime(ServerConfig(model=str(tiny_llama_dir), kv_cache_memory=100_000, max_model_len=512))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "mamp.server", "--model", str(tiny_llama_dir), "--port", str(port),
                        "--kv-cache-memory", "64KiB", "--kv-cache-dtype", "int4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    last = [line for line in r.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: --kv-cache-memory 65536 bytes") and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "mamp.server", "--model", str(tiny_llama_dir), "--kv-cache-memory",
                        "lots"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a memory size: 'lots'" in r.stderr


@pytest.mark.parametrize("text,value", [("2GiB", 2 << 30), ("512 MiB", 512 << 20), ("1.5GB", 1_500_000_000),
                                        ("1000", 1000), ("64kib", 65536)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "-1GiB", "2 parsecs", "GiB", "0"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError, match="not a memory size"):
        parse_bytes(text)


def test_abort_frees_the_blocks(tiny):
    """A sequence aborted mid-decode gives its blocks back before the next step."""
    model, tok = tiny
    runner = BatchedLlama(model, 2, 128, kv_cache_blocks=16)
    engine = Engine(runner, tok, 2, max_queue=4)
    got = threading.Event()
    ended = threading.Event()
    engine.start()
    try:
        def sink(out):
            if out.token is not None:
                got.set()
            if out.finish_reason is not None:
                ended.set()
        (seq,) = engine.submit([tok("Once upon a time").input_ids],
                               [SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)], [sink])
        assert got.wait(30) and runner.cache.allocator.num_used > 0
        engine.abort([seq])
        assert ended.wait(30)
        assert runner.cache.allocator.num_used == 0
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def tiny_packed(tiny_packed_dir):
    """The tiny model packed (RTN b = 4), loaded: its runner takes the native step and mixed prefill rows."""
    from mamp.kernels.checkpoint import load_checkpoint

    return load_checkpoint(tiny_packed_dir)[0], AutoTokenizer.from_pretrained(tiny_packed_dir)


@pytest.fixture(scope="module")
def tiny_packed_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny model packed (RTN b = 4) and saved: its folder."""
    from mamp.kernels.ops import load_cpu_ops
    from mamp.quantizer.config import QuantSpec
    from mamp.quantizer.export import save_quantized
    from mamp.quantizer.pipeline import quantize_model

    if not load_cpu_ops():
        pytest.skip("the C++ extension cannot be built here")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    spec = QuantSpec.build(method="rtn", bits=4, group_size=64, salient_group_size=64)
    out = tmp_path_factory.mktemp("tiny-packed-engine") / "ckpt"
    save_quantized(quantize_model(model, spec, None, progress=False), tok, out)
    return out


def test_the_server_prefills_long_prompts_beside_by_default(tiny_packed_dir):
    """--prefill-beside (default on) reaches the engine where the native step serves and two threads are set;
    --no-prefill-beside, or one thread, leaves prompts to the in-step chunks."""
    before = torch.get_num_threads()
    try:
        for beside, threads, want in ((True, 2, True), (False, 2, False), (True, 1, False)):
            config = ServerConfig(model=str(tiny_packed_dir), threads=threads, threads_batch=threads,
                                  prefill_beside=beside, max_model_len=128)
            runtime = build_runtime(config)
            assert runtime.engine.runner.mixed_prefill
            assert (runtime.engine._helper is not None) == want, (beside, threads)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kind,blocks", [("auto", 64), ("fp16", 64), ("int8", 64), ("auto", 12)])
def test_prompt_chunks_in_the_decode_call_give_the_same_text(tiny_packed, monkeypatch, kind, blocks):
    """The engine with prompt chunks riding in the decode step's call (8-token budget: prompts split and batched
    with running sequences) generates what it generates with separate prefill calls; with a pool of 12 blocks
    sequences are also preempted and resumed through the mixed path."""
    model, tok = tiny_packed
    prompts = [p + " and then the little dog ran to the park to play with the ball" * (i % 3 + 1) for i, p in
               enumerate(PROMPTS[:6])]
    mixed, engine = run_engine(model, tok, prompts, blocks=blocks, max_tokens=20, kind=kind)
    assert engine.runner.mixed_prefill and (engine.num_preemptions > 0) == (blocks < 64)
    monkeypatch.setattr(BatchedLlama, "mixed_prefill", property(lambda self: False))
    apart, _ = run_engine(model, tok, prompts, blocks=blocks, max_tokens=20, kind=kind)
    assert mixed == apart


@pytest.mark.parametrize("kind,blocks", [("auto", 64), ("int8", 64), ("auto", 12)])
def test_long_prompts_prefilled_beside_the_decode_steps_give_the_same_text(tiny_packed, kind, blocks):
    """Prompts longer than the 8-token budget that arrive while others decode are prefilled on the helper thread
    beside the decode steps (2 threads: one each) and give the text the in-step chunks give; with 12 blocks
    sequences are also preempted and resumed; every block comes back."""
    model, tok = tiny_packed
    prompts = [p + " and then the little dog ran to the park to play with the ball" * (i % 3 + 1) for i, p in
               enumerate(PROMPTS[:6])]
    before = torch.get_num_threads()
    try:
        beside, engine = run_engine(model, tok, prompts, blocks=blocks, max_tokens=20, kind=kind, threads=(2, 2),
                                    prefill_beside=True)
        inline, inline_engine = run_engine(model, tok, prompts, blocks=blocks, max_tokens=20, kind=kind,
                                           threads=(2, 2), prefill_beside=False)
    finally:
        torch.set_num_threads(before)
    assert engine.num_prefills_beside > 0 and (engine.num_preemptions > 0) == (blocks < 64)
    assert inline_engine.num_prefills_beside == 0
    assert beside == inline
    assert engine.runner.cache.allocator.num_used == 0 and inline_engine.runner.cache.allocator.num_used == 0


def test_a_second_long_prompt_waits_for_the_busy_helper_instead_of_riding_in_the_steps(tiny_packed):
    """Two long prompts arrive while a stream decodes: the first goes to the helper thread (its call held here),
    the second waits for it rather than riding in the engine thread's steps as chunks (which, on half the cores,
    would stall the stream for several steps each): no step made while the helper is busy carries prompt rows.
    Once released, the second is prefilled beside in turn; all three give the text the in-step chunks give."""
    model, tok = tiny_packed
    runner = BatchedLlama(model, 4, 128, kv_cache_blocks=64)
    engine = Engine(runner, tok, 4, max_queue=8, max_prefill_tokens=8, threads=(2, 2), prefill_beside=True)
    gate = threading.Event()
    # prompt-chunk rows (more than one row of a slot) of each engine-thread call made while the helper held a prompt,
    # and the engine's count of prompts passed over when the fourth such call was made
    busy_steps: list[int] = []
    waits_while_held: list[int] = []
    decode = runner.decode

    def watched_decode(slots, *args, **kw):
        if threading.current_thread().name.startswith("mamp-prefill"):
            gate.wait(30)  # the helper's first call is held until the stream has made four steps beside it
        elif engine._beside is not None:
            busy_steps.append(len(slots) - len(set(slots)))
            if len(busy_steps) == 4:
                waits_while_held.append(engine.num_beside_waits)
                gate.set()
        return decode(slots, *args, **kw)

    runner.decode = watched_decode
    outs: dict[int, list] = {0: [], 1: [], 2: []}
    done = threading.Semaphore(0)
    first_out, submitted = threading.Event(), threading.Event()

    def sink(i):
        def put(out):
            outs[i].append(out)
            if i == 0 and len(outs[0]) == 1:  # the stream decodes before the long prompts are queued
                first_out.set()
                submitted.wait(30)
            if out.finish_reason is not None:
                done.release()
        return put

    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    longs = [" ".join(["the little dog ran to the park"] * 5), " ".join(["a big red ball was in the sky"] * 4)]
    before = torch.get_num_threads()
    engine.start()
    try:
        engine.submit([tok(PROMPTS[0]).input_ids], [greedy], [sink(0)])
        assert first_out.wait(30)
        engine.submit([tok(p).input_ids for p in longs], [greedy] * 2, [sink(1), sink(2)])
        submitted.set()
        for _ in range(3):
            assert done.acquire(timeout=60)
    finally:
        gate.set()
        submitted.set()
        engine.shutdown()
        torch.set_num_threads(before)
    # four steps of the stream while the helper held the first prompt, and later ones while it prefilled the second:
    # none carried rows of the waiting prompt (without the wait, each carries an 8-token chunk of it)
    assert len(busy_steps) > 4 and not any(busy_steps), busy_steps
    assert waits_while_held and waits_while_held[0] >= 4  # passed over at each of those steps
    assert engine.num_prefills_beside == 2 and runner.cache.allocator.num_used == 0
    got = [[o.token.token_id for o in outs[i] if o.token is not None] for i in range(3)]
    inline, _ = run_engine(model, tok, [PROMPTS[0]] + longs, blocks=64, max_tokens=40)
    assert got == inline


def test_a_prompt_aborted_while_prefilled_beside_ends_at_once_and_frees_its_blocks_after_the_helper(tiny_packed):
    """The helper thread's job is held in its first call; the prompt is aborted meanwhile: the abort is answered
    and the other stream goes on without waiting for the held call, and the aborted prompt's blocks go back to the
    pool only once no call of the helper is writing them; the stream beside it finishes as it would alone."""
    model, tok = tiny_packed
    runner = BatchedLlama(model, 4, 128, kv_cache_blocks=64)
    engine = Engine(runner, tok, 4, max_queue=8, max_prefill_tokens=8, threads=(2, 2), prefill_beside=True)
    gate, entered, in_helper = threading.Event(), threading.Event(), threading.Event()
    released_while_busy = []
    decode, release = runner.decode, runner.release

    def held_decode(*args, **kw):
        if threading.current_thread().name.startswith("mamp-prefill"):
            in_helper.set()
            entered.set()
            gate.wait(30)
            try:
                return decode(*args, **kw)
            finally:
                in_helper.clear()
        return decode(*args, **kw)

    def watched_release(slot):
        released_while_busy.append((slot, in_helper.is_set()))
        release(slot)

    runner.decode, runner.release = held_decode, watched_release
    outs: dict[int, list] = {0: [], 1: []}
    done = threading.Semaphore(0)
    first_out, submitted, aborted = threading.Event(), threading.Event(), threading.Event()

    def sink(i):
        def put(out):
            outs[i].append(out)
            if i == 0 and len(outs[0]) == 1:  # the engine thread holds here until the long prompt is queued, so
                first_out.set()  # it arrives beside a decoding sequence however fast this one decodes
                submitted.wait(30)
            if i == 1 and out.finish_reason == "abort":
                aborted.set()
            if out.finish_reason is not None:
                done.release()
        return put

    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    before = torch.get_num_threads()
    engine.start()
    try:
        engine.submit([tok("Once upon a time").input_ids], [greedy], [sink(0)])
        assert first_out.wait(30)
        long_ids = tok(" ".join(["the little dog ran to the park"] * 6)).input_ids
        (long_id,) = engine.submit([long_ids], [greedy], [sink(1)])
        submitted.set()
        assert entered.wait(30) and engine.num_prefills_beside == 1
        engine.abort([long_id])
        assert aborted.wait(30)  # answered while the helper's call is still held
        assert in_helper.is_set() and engine.runner.cache.allocator.num_used > 0
        gate.set()
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
    finally:
        gate.set()
        submitted.set()
        engine.shutdown()
        torch.set_num_threads(before)
    assert outs[1][-1].finish_reason == "abort" and outs[0][-1].finish_reason == "length"
    long_slot = 1  # the first sequence took row 0 (the lowest free row)
    released = [busy for slot, busy in released_while_busy if slot == long_slot]
    assert released == [False]  # once, and not while a call of the helper was running
    assert runner.cache.allocator.num_used == 0
    alone, _ = run_engine(model, tok, ["Once upon a time"], blocks=64, max_tokens=30)
    assert [o.token.token_id for o in outs[0] if o.token is not None] == alone[0]
