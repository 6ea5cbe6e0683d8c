"""The native decode layer (kernels/cpu_decode_layer.cpp via kernels/native_decode.py) against the Python stages it
replaces (kernels/llama_block.py + server/batched_llama.py's attention over the paged cache, server/kv_cache.py):
cache writes (fp32, int8, int4), layer outputs and the runner's logits, over ragged positions, rows not in order,
block boundaries and GQA; and where it is refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mamp.kernels.checkpoint import load_checkpoint
from mamp.server.batched_llama import BatchedLlama
from tests.helpers import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_llama(inter=144, tie=False)  # hidden 64, 4 heads of 16, 2 KV heads; FFN 144 = 9 tiles
    return save_packed(model, tmp_path_factory.mktemp("native") / "ckpt", group_size=64)


def save_packed(model, out, group_size: int):
    """model's weights redrawn at a scale that exercises the kernels, quantized RTN b = 4 and saved to out."""
    from mamp.quantizer.config import QuantSpec
    from mamp.quantizer.export import save_quantized
    from mamp.quantizer.pipeline import quantize_model

    for p in model.parameters():
        p.data.normal_(0, 0.1)
    spec = QuantSpec.build(method="rtn", bits=4, group_size=group_size, salient_group_size=group_size)
    save_quantized(quantize_model(model, spec, None, progress=False), tiny_tokenizer(), out)
    return out


def decode_both_ways(runner, prompts: dict, steps: int) -> dict:
    """Logits of `steps` batched decode steps after prefilling prompts {slot: ids}, once through the Python
    stages and once natively (each from a fresh prefill): {"python": [steps, rows, vocab], "native": ...}."""
    native, logits = runner.native, {}
    for mode in ("python", "native"):
        runner.native = native if mode == "native" else None
        for slot, ids in prompts.items():
            runner.release(slot)
            runner.prefill(slot, ids)
        slots, pos = list(prompts), [len(ids) for ids in prompts.values()]
        logits[mode] = torch.stack([runner.decode(slots, [10 + t] * len(slots), [p + t for p in pos])
                                    for t in range(steps)])
    runner.native = native
    return logits


def runner_for(packed_dir, slots: int = 6, max_len: int = 64, kind: str = "auto", block_size: int = 16) -> BatchedLlama:
    model, _ = load_checkpoint(packed_dir)
    return BatchedLlama(model, slots, max_len, kv_cache_dtype=kind, kv_block_size=block_size)


def python_layer(runner, i, h, rows, pos):
    """The Python decode of layer i (as BatchedLlama.decode does it without the native layer)."""
    blk, b, cache = runner.blocks[i], h.shape[0], runner.cache
    cos, sin = runner._rope(pos[:, None])
    q, k, v = blk.qkv(blk.attn_in(h[:, None]), cos, sin)
    cache.write_tokens(i, rows, pos, k[:, :, 0], v[:, :, 0])
    length = int(pos.max()) + 1
    valid = torch.arange(length)[None] <= pos[:, None]
    keys, values = cache.read(i, rows, length)
    keys = keys.masked_fill(~valid[:, None, :, None], 0)
    values = values.masked_fill(~valid[:, None, :, None], 0)
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=valid[:, None, None, :], enable_gqa=True)
    mid = blk.mid(h[:, None], o.transpose(1, 2).reshape(b, 1, -1))
    return blk.out(mid, blk.mlp_act(blk.mlp_in(mid)))[:, 0]


KINDS = ["auto", "fp16", "int8", "int4"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("activations", ["int8", "float"])
@torch.inference_mode()
def test_native_layer_equals_the_python_stages(packed_dir, monkeypatch, activations, kind):
    """One layer's step over a paged cache: the same cache bytes written (codes, scales and zeros bit for bit),
    the same output; rows not dense nor sorted, ragged positions across block boundaries, blocks not in order."""
    monkeypatch.setenv("MAMP_CPU_ACTIVATIONS", activations)
    runner = runner_for(packed_dir, kind=kind)
    assert runner.native is not None, runner.native_reason
    cache = runner.cache
    g = torch.Generator().manual_seed(1)
    rows = torch.tensor([4, 0, 2])
    pos = torch.tensor([0, 17, 40])  # a first token, ragged lengths
    cache.ensure(3, 20)  # row 3 takes the lowest blocks, so the others' are not 0, 1, 2 ...
    for r, p in zip(rows.tolist(), pos.tolist()):
        cache.ensure(r, p + 1)
    for i, layer in enumerate(runner.native):
        for r, p in zip(rows.tolist(), pos.tolist()):  # earlier positions: real (quantized) entries
            cache.write(i, r, 0, torch.randn(2, p + 1, 16, generator=g), torch.randn(2, p + 1, 16, generator=g))
        before = [t.clone() for t in cache.layer_tensors(i)]
        h = torch.randn(3, 64, generator=g)
        ref = python_layer(runner, i, h, rows, pos)
        after_ref = [t.clone() for t in cache.layer_tensors(i)]
        for t, b0 in zip(cache.layer_tensors(i), before):
            t.copy_(b0)
        cos, sin = runner._rope(pos[:, None])
        out = layer.forward(h, cache.layer_tensors(i), cache.tables, rows, pos, cos.view(3, -1), sin.view(3, -1))
        for t, want in zip(cache.layer_tensors(i), after_ref):
            if kind == "auto":
                torch.testing.assert_close(t, want, rtol=0, atol=1e-5, equal_nan=True)
            else:  # quantization of the same k, v (to 1e-5) may round one code differently at a tie
                diff = (t.float() - want.float()).abs().nan_to_num(0)
                assert int((diff > 1e-3).sum()) <= 2, f"{int((diff > 1e-3).sum())} cache entries differ"
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("kind,block_size", [(k, 16) for k in KINDS] + [("int4", 5), ("auto", 1)])
@torch.inference_mode()
def test_runner_decodes_the_same_logits_natively(packed_dir, float_activations, kind, block_size):
    """Several steps of batched decode, native against the Python stages (fp32 activations: equal to rounding)."""
    runner = runner_for(packed_dir, kind=kind, block_size=block_size)
    assert runner.native is not None
    prompts = {1: [5, 6, 7], 3: [9] * 15, 4: [3, 1, 4, 1, 5]}  # row 3 crosses a block boundary while decoding
    logits = decode_both_ways(runner, prompts, 4)
    torch.testing.assert_close(logits["native"], logits["python"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [2, 3])
@torch.inference_mode()
def test_threads_give_the_one_thread_logits(packed_dir, threads):
    """Each attention task (a sequence and KV head) and each kernel tile is computed by one thread, whichever
    thread takes it (threads help with the others' lists once theirs is done): the native step's logits are
    the same bit for bit on 1, 2 and 3 threads (3 on 2 cores: preempted threads' tasks are taken over)."""
    prompts = {0: [5, 6, 7], 2: [9] * 40, 3: [3, 1, 4, 1, 5], 5: [2] * 17}  # lengths differ: lists by cost
    out = {}
    for t in (1, threads):
        runner = runner_for(packed_dir)
        for slot, ids in prompts.items():
            runner.prefill(slot, ids)
        torch.set_num_threads(t)
        try:
            slots, pos = list(prompts), [len(ids) for ids in prompts.values()]
            out[t] = torch.stack([runner.decode(slots, [10 + i] * len(slots), [p + i for p in pos])
                                  for i in range(3)])
        finally:
            torch.set_num_threads(1)
    assert torch.equal(out[threads], out[1])


@pytest.mark.parametrize("heads,kv_heads,hidden", [(3, 1, 192), (2, 2, 48), (2, 1, 256)])
@pytest.mark.parametrize("kind", ["auto", "fp16", "int8"])
@torch.inference_mode()
def test_head_sizes_decode_the_same_logits_natively(tmp_path, float_activations, heads, kv_heads, hidden, kind):
    """Head sizes the attention's register-blocked products take (64 with three query heads per KV head, as
    SmolLM2; 128) and one they leave to the plain loops (24, not a multiple of 16): native equals Python over
    steps that cross block boundaries, with rows of different lengths."""
    model = tiny_llama(inter=64, tie=False, heads=heads, kv_heads=kv_heads, hidden=hidden)
    runner = runner_for(save_packed(model, tmp_path / "ckpt", group_size=16), kind=kind)
    assert runner.native is not None, runner.native_reason
    prompts = {0: list(range(3, 24)), 2: [7, 8], 5: list(range(40, 70))}  # 21, 2 and 30 tokens
    logits = decode_both_ways(runner, prompts, 12)
    torch.testing.assert_close(logits["native"], logits["python"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["auto", "int4"])
@torch.inference_mode()
def test_the_stack_is_the_layers_in_one_call(packed_dir, kind):
    """DecodeStack.forward (the runner's decode path) writes the same cache and returns the same hidden state as
    the layers' own forward calls in turn; a cache list that does not split evenly over the layers is refused."""
    runner = runner_for(packed_dir, kind=kind)
    cache, n = runner.cache, len(runner.native)
    rows, pos = torch.tensor([1, 4]), torch.tensor([3, 20])
    g = torch.Generator().manual_seed(3)
    for r, p in zip(rows.tolist(), pos.tolist()):
        cache.ensure(r, p + 1)
        for i in range(n):
            cache.write(i, r, 0, torch.randn(2, p, 16, generator=g), torch.randn(2, p, 16, generator=g))
    h = torch.randn(2, 64, generator=g)
    cos, sin = (t.view(2, -1) for t in runner._rope(pos[:, None]))
    flat = [t for i in range(n) for t in cache.layer_tensors(i)]
    before = [t.clone() for t in flat]
    want = h
    for i, layer in enumerate(runner.native):
        want = layer.forward(want, cache.layer_tensors(i), cache.tables, rows, pos, cos, sin)
    after = [t.clone() for t in flat]
    for t, b0 in zip(flat, before):
        t.copy_(b0)
    got = runner.native_stack.forward(h, flat, cache.tables, rows, pos, cos, sin)
    assert torch.equal(got, want)
    for t, a in zip(flat, after):
        assert torch.equal(t.nan_to_num(0), a.nan_to_num(0))
    with pytest.raises(RuntimeError, match="cache tensors for"):
        runner.native_stack.forward(h, flat[:-1], cache.tables, rows, pos, cos, sin)


@torch.inference_mode()
def test_native_layer_refuses_a_position_or_block_outside_the_cache(packed_dir):
    runner = runner_for(packed_dir, max_len=64)
    cache = runner.cache
    cap = cache.max_blocks * cache.block_size
    cos, sin = runner._rope(torch.tensor([[cap]]))
    with pytest.raises(RuntimeError, match="outside the block table"):
        runner.native[0].forward(torch.zeros(1, 64), cache.layer_tensors(0), cache.tables, torch.tensor([0]),
                                 torch.tensor([cap]), cos.view(1, -1), sin.view(1, -1))
    cache.tables[0, 0] = cache.num_blocks  # a corrupt table entry is refused, not followed
    with pytest.raises(RuntimeError, match="outside the pool"):
        runner.native[0].forward(torch.zeros(1, 64), cache.layer_tensors(0), cache.tables, torch.tensor([0]),
                                 torch.tensor([3]), cos.view(1, -1), sin.view(1, -1))


def test_where_the_native_step_does_not_apply(packed_dir, monkeypatch):
    runner = BatchedLlama(tiny_llama(inter=144), 6, 64)  # nn.Linear layers
    assert runner.native is None and "not fused packed layers" in runner.native_reason
    monkeypatch.setenv("MAMP_NATIVE_DECODE", "0")
    runner = runner_for(packed_dir)
    assert runner.native is None and runner.native_reason == "MAMP_NATIVE_DECODE=0"


@torch.inference_mode()
def test_lm_head_runs_on_its_own_thread_count_and_restores_it(packed_dir):
    runner = runner_for(packed_dir)
    h = torch.randn(2, 64)
    ref = runner._logits(h)
    runner.head_threads = 2
    seen = []
    hook = runner.model.lm_head.register_forward_pre_hook(lambda mod, args: seen.append(torch.get_num_threads()))
    try:
        out = runner._logits(h)
    finally:
        hook.remove()
    assert seen == [2] and torch.get_num_threads() == 1  # one_thread fixture: restored afterwards
    torch.testing.assert_close(out, ref)


def chunks_and_prefill(ckpt, kind: str, prompt: list[int], split: int) -> dict:
    """A prompt cached two ways beside another sequence (slot 0): runner.prefill, and as rows of two decode calls
    (the first `split` tokens beside slot 0's decode row, then the rest). Per way: the last position's logits,
    slot 0's logits beside it, the prompt's cached keys of every layer, and three decode steps of both after."""
    other, results = [7, 7, 2], {}
    for mode in ("prefill", "rows"):
        runner = runner_for(ckpt, kind=kind)
        assert runner.native is not None and runner.mixed_prefill, runner.native_reason
        runner.prefill(0, other)
        runner.cache.ensure(2, len(prompt) + 1)
        if mode == "prefill":
            first = runner.prefill(2, prompt)
            beside = runner.decode([0], [11], [len(other)])[0]
        else:
            rest = len(prompt) - split
            a = runner.decode([0] + [2] * split, [11] + prompt[:split], [len(other)] + list(range(split)),
                              logit_rows=[0])
            b = runner.decode([2] * rest, prompt[split:], list(range(split, len(prompt))), logit_rows=[rest - 1])
            assert a.shape == (1, runner.vocab_size) and b.shape == (1, runner.vocab_size)
            beside, first = a[0], b[0]
        keys = torch.stack([runner.cache.read(i, torch.tensor([2]), len(prompt))[0] for i in range(len(runner.blocks))])
        steps = [runner.decode([0, 2], [12 + i, 20 + i], [len(other) + 1 + i, len(prompt) + i]) for i in range(3)]
        results[mode] = {"logits": first, "beside": beside, "keys": keys, "steps": torch.stack(steps)}
    return results


@pytest.mark.parametrize("kind", ["auto", "fp16", "int8"])
@torch.inference_mode()
def test_prompt_chunks_ride_in_the_decode_call(packed_dir, kind):
    """A prompt prefilled as rows of decode calls (two chunks, beside another sequence's decode rows) caches what
    runner.prefill caches and gives the same last-position logits, and the decode steps after it agree."""
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]
    results = chunks_and_prefill(packed_dir, kind, prompt, 12)
    for name in ("logits", "beside", "steps"):
        got, want = results["rows"][name], results["prefill"][name]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("heads,kv_heads,hidden", [(3, 1, 192), (2, 1, 256), (4, 4, 256)])
@pytest.mark.parametrize("kind", ["auto", "fp32", "int8"])
@torch.inference_mode()
def test_prompt_chunk_rows_attended_together_give_what_prefill_gives(tmp_path, float_activations, heads, kv_heads,
                                                                    hidden, kind):
    """Head sizes 64 and 128 (three, two and one query heads per KV head): a prompt chunk's rows are attended
    together, 16 a task (the run path of cpu_decode_layer.cpp): a first chunk of 21 rows (16 + 5) beside another
    sequence's decode row, then 19 rows from position 21 (across block boundaries, causal within the chunk), give
    the last-position logits and cache of runner.prefill, and the decode steps after them agree."""
    model = tiny_llama(inter=64, tie=False, heads=heads, kv_heads=kv_heads, hidden=hidden)
    ckpt = save_packed(model, tmp_path / "ckpt", group_size=16)
    results = chunks_and_prefill(ckpt, kind, [(7 * i + 3) % 90 + 5 for i in range(40)], 21)
    for name in ("logits", "beside", "keys", "steps"):
        got, want = results["rows"][name], results["prefill"][name]
        # keys in a 16-bit cache may round one step apart (1e-3 of a value) where the sums differ in the last bit
        tol = 2e-3 if name == "keys" and kind != "fp32" else 1e-4
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * float(want.abs().max()))
