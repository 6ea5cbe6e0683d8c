"""Decode attention over the paged KV cache: the Triton kernel (kernels/triton_paged_attention.py) against the
reference (kernels/paged_attention.py) for fp32 / int8 / int4 entries, grouped query heads, ragged positions,
scattered blocks, block sizes that do and do not divide the tiles, a head size that is not a power of two; and
the runner's Python decode path with either.

On a GPU the Triton cases run on CUDA. Without one they run on the CPU under TRITON_INTERPRET=1 (set before triton
is imported): `test_paged_attention_interpreted` re-runs this file in a subprocess with it set."""
from __future__ import annotations

import os

import pytest
import torch

from mamp.kernels.paged_attention import choose_decode_attention, decode_attention_reference, read_dense
from mamp.server.kv_cache import PagedKVCache
from tests.helpers import run_interpreted, tiny_llama
from tests.test_kv_cache import rope_tables

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRET
RUN_HERE = INTERPRET or ON_GPU
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
needs_triton = pytest.mark.skipif(not RUN_HERE, reason="run via test_paged_attention_interpreted (no GPU)")


def filled_cache(kind: str, block_size: int, kvh: int, d: int, seed: int = 0):
    """A one-layer cache whose rows were written in turns (chunks and single tokens), so their blocks interleave;
    row 3 takes the lowest blocks first. Returns the cache and each row's length."""
    g = torch.Generator().manual_seed(seed)
    max_len = 48
    cache = PagedKVCache(1, 4, kvh, d, max_len, DEVICE, torch.float32, kind, num_blocks=4 * (-(-max_len // block_size)),
                         block_size=block_size, rope=rope_tables(max_len, d))
    lengths = {3: 0, 0: 0, 1: 0, 2: 0}
    want = {3: 40, 0: 1, 1: 17, 2: 33}
    for chunk in (1, 7, 16, 1, 9, 1, 13):
        for r in lengths:
            t = min(chunk, want[r] - lengths[r])
            if t <= 0:
                continue
            start = lengths[r]
            cache.ensure(r, start + t)
            k, v = (torch.randn(kvh, t, d, generator=g) * 2 + torch.randn(kvh, 1, d, generator=g)).to(DEVICE), \
                torch.randn(kvh, t, d, generator=g).to(DEVICE)
            if t == 1 and start > 0:  # the decode step's write
                cache.write_tokens(0, torch.tensor([r], device=DEVICE), torch.tensor([start], device=DEVICE),
                                   k[:, 0][None], v[:, 0][None])
            else:
                cache.write(0, r, start, k, v)
            lengths[r] = start + t
    assert lengths == want
    return cache, lengths


CASES = [  # kind, block size, query heads, KV heads, head dim
    ("auto", 16, 4, 2, 16), ("int8", 16, 4, 2, 16), ("int4", 16, 4, 2, 16),
    ("int4", 5, 6, 2, 24), ("int8", 1, 3, 3, 16), ("auto", 5, 8, 1, 24)]


@needs_triton
@pytest.mark.parametrize("kind,block_size,heads,kvh,d", CASES)
def test_triton_paged_attention_matches_the_reference(kind, block_size, heads, kvh, d):
    from mamp.kernels.triton_paged_attention import decode_attention_triton

    cache, lengths = filled_cache(kind, block_size, kvh, d)
    g = torch.Generator().manual_seed(1)
    rows = torch.tensor([2, 0, 3, 1], device=DEVICE)  # not in order; ragged lengths 33, 1, 40, 17
    positions = torch.tensor([lengths[r] - 1 for r in rows.tolist()], device=DEVICE)
    q = (torch.randn(4, heads, d, generator=g) * 2).to(DEVICE)
    tensors, table = cache.layer_tensors(0), cache.tables
    ref = decode_attention_reference(q, tensors, table, rows, positions)
    for block_n in (16, 32):
        out = decode_attention_triton(q, tensors, table, rows, positions, block_n=block_n)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    one = decode_attention_triton(q[2:3], tensors, table, rows[2:3], positions[2:3])  # one sequence
    torch.testing.assert_close(one, ref[2:3], rtol=1e-4, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("kind", ["int8", "int4"])
@torch.inference_mode()
def test_runner_decodes_the_same_with_the_triton_attention(kind):
    """The runner's Python decode path (a model of nn.Linear layers: no native step) with the Triton attention
    against the reference, over prefills and several batched steps."""
    from mamp.kernels.triton_paged_attention import decode_attention_triton
    from mamp.server.batched_llama import BatchedLlama

    model = tiny_llama().to(DEVICE)
    runner = BatchedLlama(model, 4, 64, kv_cache_dtype=kind, kv_block_size=16)
    assert runner.native is None
    prompts = {1: [5, 6, 7], 3: [9] * 15, 0: [3, 1, 4, 1, 5]}  # row 3 crosses a block boundary while decoding
    logits = {}
    for name, fn in (("reference", decode_attention_reference), ("triton", decode_attention_triton)):
        runner.attention = fn
        for slot, ids in prompts.items():
            runner.release(slot)
            runner.prefill(slot, ids)
        slots, pos = list(prompts), [len(ids) for ids in prompts.values()]
        logits[name] = torch.stack([runner.decode(slots, [10 + s] * 3, [p + s for p in pos]) for s in range(3)])
    torch.testing.assert_close(logits["triton"], logits["reference"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["auto", "int8", "int4"])
def test_reference_is_a_softmax_over_each_rows_own_positions(kind):
    """The reference against a per-sequence loop over the dense read (no masking tricks): rows of different
    lengths in one batch see only their own positions."""
    if RUN_HERE and DEVICE.type == "cuda":
        pytest.skip("CPU reference case")
    cache, lengths = filled_cache(kind, 16, 2, 16)
    rows = torch.tensor([1, 3, 0])
    positions = torch.tensor([lengths[r] - 1 for r in rows.tolist()])
    q = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(2))
    out = decode_attention_reference(q, cache.layer_tensors(0), cache.tables, rows, positions)
    for i, (r, p) in enumerate(zip(rows.tolist(), positions.tolist())):
        keys, values = read_dense(cache.layer_tensors(0), cache.tables, rows[i:i + 1], p + 1, torch.float32)
        kx = keys[0].repeat_interleave(2, dim=0)  # [H, L, D]: query head h reads KV head h // 2
        vx = values[0].repeat_interleave(2, dim=0)
        w = torch.softmax((q[i][:, None] * kx).sum(-1) / 4.0, dim=-1)  # [H, L]
        torch.testing.assert_close(out[i], (w[..., None] * vx).sum(1), rtol=1e-5, atol=1e-5)


def test_the_triton_attention_is_chosen_only_on_cuda(monkeypatch):
    assert choose_decode_attention(torch.device("cpu")) == (decode_attention_reference, "reference (not on CUDA)")
    monkeypatch.setenv("MAMP_TRITON_ATTENTION", "0")
    fn, why = choose_decode_attention(torch.device("cuda"))
    assert fn is decode_attention_reference and "MAMP_TRITON_ATTENTION=0" in why


@pytest.mark.skipif(RUN_HERE, reason="the interpreted run itself")
def test_paged_attention_interpreted():
    """The Triton cases above, on the CPU under TRITON_INTERPRET=1, in a child process."""
    run_interpreted(__file__, "triton", no_skips=True)
