"""Decode attention over the paged KV cache in Triton: kernels/paged_attention.py's signature and reference.

One program per (sequence, KV head) serves the query heads that share it (grouped-query attention), so each cached
entry is read once for all of them. It walks the sequence's positions in tiles of BLOCK_N, looks each position's
block up in the row's block table, loads the entries where they lie (no gathered copy), dequantizes them in
registers (int8: code x scale; int4: the nibble x scale + zero) and keeps an online softmax (running max and sum),
so the cache is read once. Quantized entries hold Hadamard-rotated vectors (kernels/kv_quant.py): the wrapper
rotates the queries in (q . k = Hq . Hk) and the outputs back (sum p Hv = H sum p v). int4 keys are stored less
R(p) mu: the kernel adds q . R(p) mu to each score as sum_i table[i, p] (A, B)_i, with (A, B) from the unrotated
query and mu (computed by the wrapper), and takes position 0 from the row's sink.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mamp.kernels import kv_quant
from mamp.kernels.paged_attention import kind_of


@triton.jit
def _paged_decode_kernel(q_ptr, ab_ptr, out_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, kz_ptr, vz_ptr, sink_ptr, tab_ptr,
                         table_ptr, rows_ptr, pos_ptr, num_blocks, max_blocks, npos, scale,
                         H: tl.constexpr, KVH: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr,
                         D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr, KIND: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    row = tl.load(rows_ptr + b).to(tl.int64)
    n = tl.load(pos_ptr + b).to(tl.int64) + 1
    gi = tl.arange(0, GP)
    d = tl.arange(0, DP)
    hmask = gi < GROUP
    dmask = d < D
    qoff = (b * H + g * GROUP + gi)[:, None] * D + d[None, :]
    qmask = hmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + qoff, mask=qmask, other=0.0).to(tl.float32)  # [GP, DP]
    if KIND == 4:
        ab = tl.load(ab_ptr + qoff, mask=qmask, other=0.0).to(tl.float32)
        half = D // 2
        dd = tl.where(d < half, d, d - half)  # the byte of element d: low nibble in the first half, high the second
        hi = d >= half
        sink_k = tl.load(sink_ptr + ((row * 2) * KVH + g) * D + d, mask=dmask, other=0.0)
        sink_v = tl.load(sink_ptr + ((row * 2 + 1) * KVH + g) * D + d, mask=dmask, other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    for start in range(0, n, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N).to(tl.int64)
        jmask = j < n
        blk = tl.load(table_ptr + row * max_blocks + j // BS, mask=jmask, other=0).to(tl.int64)
        e = (g * num_blocks + blk) * BS + j % BS  # entry index [BLOCK_N]
        emask = jmask[:, None] & dmask[None, :]
        if KIND == 0:
            k = tl.load(k_ptr + e[:, None] * D + d[None, :], mask=emask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + e[:, None] * D + d[None, :], mask=emask, other=0.0).to(tl.float32)
        elif KIND == 8:
            ks = tl.load(ks_ptr + e, mask=jmask, other=0.0).to(tl.float32)
            vs = tl.load(vs_ptr + e, mask=jmask, other=0.0).to(tl.float32)
            k = tl.load(k_ptr + e[:, None] * D + d[None, :], mask=emask, other=0).to(tl.float32) * ks[:, None]
            v = tl.load(v_ptr + e[:, None] * D + d[None, :], mask=emask, other=0).to(tl.float32) * vs[:, None]
        else:
            ks = tl.load(ks_ptr + e, mask=jmask, other=0.0).to(tl.float32)
            vs = tl.load(vs_ptr + e, mask=jmask, other=0.0).to(tl.float32)
            kz = tl.load(kz_ptr + e, mask=jmask, other=0.0).to(tl.float32)
            vz = tl.load(vz_ptr + e, mask=jmask, other=0.0).to(tl.float32)
            kb = tl.load(k_ptr + e[:, None] * half + dd[None, :], mask=emask, other=0).to(tl.int32)
            vb = tl.load(v_ptr + e[:, None] * half + dd[None, :], mask=emask, other=0).to(tl.int32)
            kc = tl.where(hi[None, :], kb >> 4, kb & 15).to(tl.float32)
            vc = tl.where(hi[None, :], vb >> 4, vb & 15).to(tl.float32)
            first = (j == 0)[:, None]
            k = tl.where(first, sink_k[None, :], kc * ks[:, None] + kz[:, None])
            v = tl.where(first, sink_v[None, :], vc * vs[:, None] + vz[:, None])
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GP, BLOCK_N]
        if KIND == 4:  # q . R(j) mu for j > 0 (the sink holds k itself)
            t = tl.load(tab_ptr + d[None, :] * npos + j[:, None], mask=emask, other=0.0)  # [BLOCK_N, DP]
            c = tl.sum(ab[:, None, :] * t[None, :, :], axis=2)
            s += tl.where((j > 0)[None, :], c, 0.0)
        s = tl.where(jmask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(out_ptr + qoff, o, mask=qmask)


def decode_attention_triton(q: torch.Tensor, tensors: list[torch.Tensor], table: torch.Tensor, rows: torch.Tensor,
                            positions: torch.Tensor, block_n: int = 32) -> torch.Tensor:
    """kernels/paged_attention.decode_attention_reference, reading the blocks in place."""
    kind = kind_of(tensors)
    bsz, h, dim = q.shape
    k, v = tensors[0], tensors[1]
    kvh, num_blocks, bs = k.shape[:3]
    assert h % kvh == 0 and table.dtype == torch.int32 and table.is_contiguous(), "geometry / table"
    assert all(t.is_contiguous() for t in tensors), "cache tensors must be contiguous"
    group = h // kvh
    qf = q.float()
    ab = qf  # unused unless int4
    if kind != "auto":
        if kind == "int4":  # (A, B) of q . R(p) mu = sum_i<D/2 cos_p,i A_i + sin_p,i B_i, per query head
            mu = tensors[6][rows].repeat_interleave(group, dim=1)  # [B, H, D]
            hd = dim // 2
            qa, qb, ma, mb = qf[..., :hd], qf[..., hd:], mu[..., :hd], mu[..., hd:]
            ab = torch.cat((qa * ma + qb * mb, qb * ma - qa * mb), -1).contiguous()
        qf = kv_quant.rotate(qf)
    qf = qf.contiguous()
    out = torch.empty_like(qf)
    dummy = qf
    ks, vs = (tensors[2], tensors[3]) if kind != "auto" else (dummy, dummy)
    kz, vz = (tensors[4], tensors[5]) if kind == "int4" else (dummy, dummy)
    sink, tab = (tensors[7], tensors[8]) if kind == "int4" else (dummy, dummy)
    npos = tab.shape[1] if kind == "int4" else 0
    if kind == "int4":
        assert int(positions.max()) < npos, "position beyond the rope table"
    _paged_decode_kernel[(bsz, kvh)](
        qf, ab, out, k, v, ks, vs, kz, vz, sink, tab, table, rows.contiguous(), positions.contiguous(),
        num_blocks, table.shape[1], npos, 1.0 / dim ** 0.5,
        H=h, KVH=kvh, GROUP=group, GP=triton.next_power_of_2(group), D=dim, DP=triton.next_power_of_2(dim), BS=bs,
        KIND={"auto": 0, "int8": 8, "int4": 4}[kind], BLOCK_N=block_n)
    if kind != "auto":
        out = kv_quant.rotate(out)
    return out.to(q.dtype)
