"""Triton device functions shared by the packed GEMV and GEMM kernels: load a tile of word rows with everything
that describes them, and decode code i of each word (both kinds computed, the bitmap bit selects).

A word row r of column n covers input rows r*(32/b) .. r*(32/b) + 32/b - 1, all in 16-row group r // (b/2),
hence in one scale group and one salient scale group: scales, zeros and the bitmap bit are per word.
"""
import triton
import triton.language as tl


@triton.jit
def load_word_rows(qw_ptr, bm_ptr, sc_ptr, z_ptr, hsc_ptr, hz_ptr, offs_r, offs_n, mask, N,
                   B: tl.constexpr, GS: tl.constexpr, SGS: tl.constexpr):
    """Words [R, BN] int32 and, per word: salient flag, scale, zero, salient scale, salient zero (fp32)."""
    VPW: tl.constexpr = 32 // B
    WPG: tl.constexpr = B // 2
    col = offs_n[None, :]
    words = tl.load(qw_ptr + offs_r[:, None] * N + col, mask=mask, other=0)
    g = offs_r // WPG
    byte = tl.load(bm_ptr + (g // 8)[:, None] * N + col, mask=mask, other=0).to(tl.int32)
    sal = ((byte >> (g % 8)[:, None]) & 1) != 0
    k0 = offs_r * VPW
    sg = (k0 // GS)[:, None] * N + col
    hg = (k0 // SGS)[:, None] * N + col
    s = tl.load(sc_ptr + sg, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + sg, mask=mask, other=0).to(tl.float32)
    hs = tl.load(hsc_ptr + hg, mask=mask, other=0.0).to(tl.float32)
    hz = tl.load(hz_ptr + hg, mask=mask, other=0).to(tl.float32)
    return words, sal, s, z, hs, hz


@triton.jit
def decode_code(words, sal, s, z, hs, hz, I: tl.constexpr, B: tl.constexpr, H: tl.constexpr):
    """fp32 weights of input row r*(32/b) + I for every word: (q - z) s, or (hq - hz) hs where salient."""
    RUN: tl.constexpr = H // B
    lo = ((words >> (B * I)) & ((1 << B) - 1)).to(tl.float32)
    hi = ((words >> (H * (I // RUN))) & ((1 << H) - 1)).to(tl.float32)
    return tl.where(sal, (hi - hz) * hs, (lo - z) * s)
