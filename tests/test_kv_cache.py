"""The paged KV cache (server/kv_cache.py) and its quantized entries (kernels/kv_quant.py): quantization round
trips, block allocation under random admission / finish / abort, and reads of paged (and quantized) blocks
against a dense reference over ragged lengths and block boundaries."""
from __future__ import annotations

import random

import pytest
import torch

from mamp.kernels import kv_quant
from mamp.server.kv_cache import BlockAllocator, NoFreeBlocks, PagedKVCache, bytes_per_token


@pytest.mark.parametrize("kind,levels", [("int8", 127), ("int4", 15)])
def test_quantize_round_trip_error_and_stable_codes(kind, levels):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 64, generator=g) * torch.tensor([0.01, 1.0, 300.0])[None, :, None]
    x[0, 0, 7] = 40.0  # an outlier channel
    codes, scale, zero = kv_quant.quantize(x, kind)
    assert codes.dtype == kv_quant.STORAGE[kind] and codes.shape[-1] == kv_quant.code_dim(kind, 64)
    assert scale.dtype == torch.float16 and scale.shape == (5, 3)
    y = kv_quant.dequantize(codes, scale, zero, kind)
    xr, yr = kv_quant.rotate(x), kv_quant.rotate(y)  # the error bound holds where the codes live
    span = (xr.abs().amax(-1) * 2 if kind == "int8" else xr.amax(-1) - xr.amin(-1))[..., None]
    # half a step, plus fp16 rounding of the scale (and zero) over the whole range of codes
    assert bool(((yr - xr).abs() <= span / (2 * levels) * 1.01 + span * 2e-3).all())
    # the rotation is orthonormal: the error's size is the same in the original basis
    torch.testing.assert_close((y - x).norm(dim=-1), (yr - xr).norm(dim=-1), rtol=1e-4, atol=1e-5)
    again = kv_quant.quantize(y, kind)  # dequantized vectors quantize to the same codes
    assert torch.equal(again[0], codes) and torch.equal(again[1], scale)


def test_rotate_is_an_orthonormal_involution_in_power_of_two_blocks():
    g = torch.Generator().manual_seed(1)
    for d in (64, 96, 80, 6):  # blocks of 64, 32, 16, 2
        x = torch.randn(3, d, generator=g)
        r = kv_quant.rotate(x)
        torch.testing.assert_close(kv_quant.rotate(r), x, rtol=0, atol=1e-5)
        torch.testing.assert_close(r.norm(dim=-1), x.norm(dim=-1))
        p = d & -d
        e = torch.zeros(d)
        e[d - p] = 1.0  # the first element of the last block stays in that block, spread evenly
        r = kv_quant.rotate(e)
        assert torch.allclose(r[d - p:].abs(), torch.full((p,), p ** -0.5)) and not r[:d - p].any()


def test_int4_nibble_order_and_zero_vectors():
    x = kv_quant.rotate(torch.arange(16, dtype=torch.float32))  # rotated back inside: min 0, scale 1, codes 0 .. 15
    codes, scale, zero = kv_quant.quantize(x, "int4")
    assert codes.tolist() == [i | ((i + 8) << 4) for i in range(8)]  # element i low, i + D/2 high
    assert float(scale) == 1.0 and abs(float(zero)) < 1e-5
    for kind in ("int8", "int4"):  # zero scale: no division by zero, exact back
        c = torch.zeros(2, 8)
        q = kv_quant.quantize(c, kind)
        assert torch.equal(kv_quant.dequantize(*q, kind), c)


def test_bytes_per_token():
    # SmolLM2-135M: 30 layers, 3 KV heads of 64
    assert bytes_per_token("auto", 30, 3, 64, torch.bfloat16) == 2 * 30 * 3 * 128
    assert bytes_per_token("fp16", 30, 3, 64, torch.float32) == 2 * 30 * 3 * 128
    assert bytes_per_token("auto", 30, 3, 64, torch.float32) == 2 * 30 * 3 * 128  # fp16 under fp32 compute
    assert bytes_per_token("fp32", 30, 3, 64, torch.bfloat16) == 2 * 30 * 3 * 256
    assert bytes_per_token("int8", 30, 3, 64, torch.float32) == 2 * 30 * 3 * 66
    assert bytes_per_token("int4", 30, 3, 64, torch.float32) == 2 * 30 * 3 * 36


def test_allocator_under_random_admission_finish_and_abort():
    """Rows come and go at random lengths; no block is ever held twice, none leaks, tables match."""
    rnd = random.Random(0)
    cache = PagedKVCache(1, 6, 1, 4, max_len=200, device=torch.device("cpu"), dtype=torch.float32, num_blocks=40,
                         block_size=16)
    lengths = {}
    for _ in range(2000):
        row = rnd.randrange(6)
        if row in lengths and rnd.random() < 0.3:  # finishes or is aborted
            cache.release(row)
            del lengths[row]
            continue
        want = min(200, lengths.get(row, 0) + rnd.randrange(1, 40))
        need = cache.blocks_needed(row, want)
        free = cache.allocator.num_free
        try:
            cache.ensure(row, want)
        except NoFreeBlocks:
            assert need > free and cache.allocator.num_free == free  # nothing taken on failure
            continue
        lengths[row] = want
        held = [cache.row_blocks(r) for r in range(6)]
        flat = [b for blocks in held for b in blocks]
        assert len(flat) == len(set(flat)) == cache.allocator.num_used
        assert cache.allocator.num_used + cache.allocator.num_free == 40
        for r, blocks in enumerate(held):
            assert len(blocks) == -(-lengths.get(r, 0) // 16)
            assert cache.tables[r, :len(blocks)].tolist() == blocks
    for row in list(lengths):
        cache.release(row)
    assert cache.allocator.num_free == 40 and cache.allocator.num_used == 0
    with pytest.raises(ValueError, match="not in use"):
        cache.allocator.free([3])
    with pytest.raises(ValueError, match="exceeds the cache limit"):
        cache.ensure(0, 201)


def test_allocator_hands_out_the_lowest_blocks_first():
    alloc = BlockAllocator(8)
    assert alloc.allocate(3) == [0, 1, 2]
    alloc.free([1])
    assert alloc.allocate(2) == [1, 3]


@pytest.mark.parametrize("dtype,kind,storage", [(torch.float32, "fp16", torch.float16),
                                                 (torch.bfloat16, "auto", torch.bfloat16),
                                                 (torch.float16, "auto", torch.float16)])
def test_auto_is_a_16_bit_cache(dtype, kind, storage):
    cache = PagedKVCache(2, 2, 1, 8, max_len=32, device=torch.device("cpu"), dtype=dtype, kind="auto")
    assert cache.kind == kind and cache.k[0].dtype == storage and cache.meta[0] == []
    assert cache.bytes_per_token == cache.bytes_per_token_16bit


@pytest.mark.parametrize("kind", ["auto", "fp32", "fp16", "int8", "int4"])
def test_paged_reads_match_a_dense_reference(kind):
    """Rows written in chunks and single tokens that straddle block boundaries, blocks interleaved between rows;
    reads of any set of rows equal the dense reference (quantized: its quantize-dequantize)."""
    g = torch.Generator().manual_seed(2)
    kvh, d = 2, 8
    cos, sin = rope_tables(80, d)
    cache = PagedKVCache(2, 4, kvh, d, max_len=80, device=torch.device("cpu"), dtype=torch.float32, kind=kind,
                         num_blocks=24, block_size=16, rope=(cos, sin))
    lengths = {0: 0, 1: 0, 3: 0}
    dense = {r: torch.zeros(2, 2, kvh, 80, d) for r in lengths}  # [layer, k/v, kvh, pos, d]
    for chunk in (5, 16, 1, 1, 13, 20, 1):  # the rows grow in turns, so their blocks interleave
        for r in lengths:
            start, end = lengths[r], lengths[r] + chunk
            cache.ensure(r, end)
            for layer in range(2):
                k, v = torch.randn(2, kvh, chunk, d, generator=g)
                if chunk == 1 and r != 0:  # the decode-step write
                    cache.write_tokens(layer, torch.tensor([r]), torch.tensor([start]), k[:, 0][None], v[:, 0][None])
                else:
                    cache.write(layer, r, start, k, v)
                dense[r][layer, 0, :, start:end], dense[r][layer, 1, :, start:end] = k, v
            lengths[r] = end
    assert cache.row_blocks(0) != list(range(len(cache.row_blocks(0))))  # really scattered
    for rows in ([0], [3, 1], [1, 0, 3]):
        length = max(lengths[r] for r in rows)
        for layer in range(2):
            keys, values = cache.read(layer, torch.tensor(rows), length)
            assert keys.shape == (len(rows), kvh, length, d) and keys.dtype == torch.float32
            for i, r in enumerate(rows):
                n = lengths[r]
                ref_k, ref_v = dense[r][layer, 0, :, :n], dense[r][layer, 1, :, :n]
                if kind == "int4":  # keys centered on the row's first chunk (5 positions), R(p) mu added back
                    mu = kv_quant.key_center(ref_k[:, :5], cos[:5], sin[:5])
                    off = kv_quant.rope_rotate(mu[:, None], cos[:n], sin[:n])
                    assert torch.equal(cache.centers[layer][r], mu)
                    ref_k = kv_quant.dequantize(*kv_quant.quantize(ref_k - off, kind), kind) + off
                elif kind in ("auto", "fp16"):  # rounded to half precision (auto under fp32), read back exactly
                    ref_k, ref_v = ref_k.half().float(), ref_v.half().float()
                elif kind == "int8":
                    ref_k = kv_quant.dequantize(*kv_quant.quantize(ref_k, kind), kind)
                if kind in ("int8", "int4"):
                    ref_v = kv_quant.dequantize(*kv_quant.quantize(ref_v, kind), kind)
                if kind == "int4":  # position 0 exact (kept rotated beside the pool)
                    ref_k[:, 0] = kv_quant.rotate(kv_quant.rotate(dense[r][layer, 0, :, 0]))
                    ref_v[:, 0] = kv_quant.rotate(kv_quant.rotate(dense[r][layer, 1, :, 0]))
                assert torch.equal(keys[i, :, :n], ref_k) and torch.equal(values[i, :, :n], ref_v)


def rope_tables(n: int, d: int, theta: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style RoPE tables [n, d]: one frequency per pair (i, i + d/2)."""
    freqs = torch.arange(n).float()[:, None] * theta ** (-torch.arange(0, d, 2).float() / d)
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos(), emb.sin()


def test_int4_key_centering_removes_a_rotating_offset():
    """Keys with a large per-channel offset before RoPE (as real models' keys have), rotated by their positions:
    centered int4 reads them back far closer than int4 of the raw keys; the mean is taken without the first
    position (the attention sink), which is read back exact."""
    g = torch.Generator().manual_seed(3)
    kvh, d, n = 2, 16, 48
    cos, sin = rope_tables(64, d)
    offset = torch.randn(kvh, 1, d, generator=g) * 8
    pre = offset + torch.randn(kvh, n, d, generator=g)
    pre[:, 0] = 50  # a sink at position 0, kept out of the mean
    k = kv_quant.rope_rotate(pre, cos[:n], sin[:n])
    cache = PagedKVCache(1, 1, kvh, d, max_len=64, device=torch.device("cpu"), dtype=torch.float32, kind="int4",
                         num_blocks=4, block_size=16, rope=(cos, sin))
    cache.ensure(0, n)
    cache.write(0, 0, 0, k, k)
    torch.testing.assert_close(cache.centers[0][0], pre[:, 1:].mean(1), rtol=0, atol=1e-5)
    keys, _ = cache.read(0, torch.tensor([0]), n)
    err_centered = (keys[0, :, 1:] - k[:, 1:]).square().mean()
    err_plain = (kv_quant.dequantize(*kv_quant.quantize(k, "int4"), "int4")[:, 1:] - k[:, 1:]).square().mean()
    assert err_centered < err_plain / 10, (float(err_centered), float(err_plain))
    torch.testing.assert_close(keys[0, :, 0], k[:, 0], rtol=0, atol=1e-4)  # the sink, exact


def test_rope_tables_must_pair_the_halves():
    cos, sin = rope_tables(32, 8)
    with pytest.raises(ValueError, match="pair"):
        PagedKVCache(1, 1, 1, 8, max_len=32, device=torch.device("cpu"), dtype=torch.float32, kind="int4",
                     num_blocks=2, rope=(cos, torch.rand(32, 8)))


def test_usage_and_capacity_bytes():
    cache = PagedKVCache(3, 2, 2, 8, max_len=64, device=torch.device("cpu"), dtype=torch.float32, kind="int8",
                         num_blocks=10, block_size=16)
    per_token = bytes_per_token("int8", 3, 2, 8, torch.float32)
    assert cache.capacity_bytes == 160 * per_token and cache.usage_bytes == 0
    cache.ensure(1, 17)
    assert cache.usage_bytes == 32 * per_token
    assert cache.bytes_per_token_16bit == 2 * 3 * 2 * 8 * 2
    real = sum(t.numel() * t.element_size() for layer in range(3) for t in cache.layer_tensors(layer))
    assert real == cache.capacity_bytes  # the accounting is the tensors' own size
