"""Triton device functions shared by the packed GEMV and GEMM kernels: load a tile of word rows with everything
that describes them, and decode them (the bitmap bit selects the code's width and the grid; no branch). With
h = b both kinds are the same codes, so the bit only selects the grid.

A word row r of column n covers input rows r*(32/b) .. r*(32/b) + 32/b - 1, all in 16-row group r // (b/2),
hence in one scale group and one salient scale group: scales, zeros and the bitmap bit are per word.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mamp.kernels.packing import PackedWeight


def check_launch_args(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None,
                      out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared launcher checks. x: [..., K] fp16/bf16/fp32; packed tensors contiguous on x's device with the
    shapes of spec.shapes(); bias: [N] or None; out: [..., N] in x.dtype or None (allocated).

    Returns (x as [M, K], out [..., N], out as [M, N]).
    """
    spec = packed.spec
    k, n = spec.in_features, spec.out_features
    assert x.shape[-1] == k, f"x has {x.shape[-1]} features, layer expects {k}"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    for name, (shape, dtype) in spec.shapes().items():
        t = getattr(packed, name)
        assert tuple(t.shape) == shape and t.dtype == dtype and t.is_contiguous(), name
        assert t.device == x.device, f"{name} on {t.device}, x on {x.device}"
    if bias is not None:
        assert bias.shape == (n,) and bias.is_contiguous(), tuple(bias.shape)
    if out is None:
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    assert out.shape == (*x.shape[:-1], n) and out.dtype == x.dtype and out.is_contiguous()
    return x.reshape(-1, k), out, out.view(-1, n)


@triton.jit
def load_word_rows(qw_ptr, bm_ptr, sc_ptr, z_ptr, hsc_ptr, hz_ptr, r0, offs_n, mask_n, R, N,
                   B: tl.constexpr, GS: tl.constexpr, SGS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Words [BLOCK_R, BN] int32 of word rows r0 .. r0 + BLOCK_R - 1 (r0 a multiple of BLOCK_R; rows from R on
    read as 0) and, per word: salient flag and the scale and zero of the word's grid (fp32)."""
    VPW: tl.constexpr = 32 // B
    WPG: tl.constexpr = B // 2
    BLOCK_K: tl.constexpr = BLOCK_R * VPW
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask = (offs_r < R)[:, None] & mask_n[None, :]
    col = offs_n[None, :]
    words = tl.load(qw_ptr + offs_r[:, None] * N + col, mask=mask, other=0)
    g = offs_r // WPG
    if (GS % BLOCK_K == 0) and (SGS % BLOCK_K == 0) and (128 % BLOCK_K == 0):
        # The tile's BLOCK_K input rows lie in one scale group of each grid and one bitmap byte (r0 is a
        # multiple of BLOCK_R): one load of each per column instead of one per word.
        k0 = r0 * VPW
        byte = tl.load(bm_ptr + (k0 // 128) * N + offs_n, mask=mask_n, other=0).to(tl.int32)
        sal = ((byte[None, :] >> (g % 8)[:, None]) & 1) != 0
        s = tl.load(sc_ptr + (k0 // GS) * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        z = tl.load(z_ptr + (k0 // GS) * N + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
        hs = tl.load(hsc_ptr + (k0 // SGS) * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        hz = tl.load(hz_ptr + (k0 // SGS) * N + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
    else:
        byte = tl.load(bm_ptr + (g // 8)[:, None] * N + col, mask=mask, other=0).to(tl.int32)
        sal = ((byte >> (g % 8)[:, None]) & 1) != 0
        k0 = offs_r * VPW
        sg = (k0 // GS)[:, None] * N + col
        hg = (k0 // SGS)[:, None] * N + col
        s = tl.load(sc_ptr + sg, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sg, mask=mask, other=0).to(tl.float32)
        hs = tl.load(hsc_ptr + hg, mask=mask, other=0.0).to(tl.float32)
        hz = tl.load(hz_ptr + hg, mask=mask, other=0).to(tl.float32)
    return words, sal, tl.where(sal, hs, s), tl.where(sal, hz, z)


# 2^23 as fp32 bits: OR-ing a code q < 2^23 into its mantissa gives the float 2^23 + q exactly, so one integer
# op and one float subtraction replace an int -> float conversion (a slow instruction on NVIDIA GPUs: 16 per
# clock per SM on Hopper against 64 integer and 128 float ops).
MAGIC_BITS = tl.constexpr(0x4B000000)
MAGIC = tl.constexpr(8388608.0)


@triton.jit
def code_bits(words, sal, I: tl.constexpr, B: tl.constexpr, H: tl.constexpr):
    """2^23 + q as fp32 for code I of every word: q the b-bit code of input row r*(32/b) + I, or where salient
    the h-bit code (covering h/b rows) that holds that row. Subtract MAGIC (or MAGIC + zero) to get q (q - zero)."""
    RUN: tl.constexpr = H // B
    q = (words >> (B * I)) & ((1 << B) - 1)
    if H != B:
        hq = (words >> (H * (I // RUN))) & ((1 << H) - 1)
        q = tl.where(sal, hq, q)
    return (q | MAGIC_BITS).to(tl.float32, bitcast=True)


@triton.jit
def dequant_tile(words, sal, scale, zero, B: tl.constexpr, H: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_N: tl.constexpr, CODE_MAJOR: tl.constexpr):
    """fp32 weights [BLOCK_R * 32/b, BLOCK_N] of every input row the [BLOCK_R, BLOCK_N] words cover.

    Row order: CODE_MAJOR false, input-row order (tile row r*(32/b) + i is word row r, code i: the row-major order
    of [r, i]), so one tl.dot consumes BLOCK_R * 32/b contiguous activation columns; CODE_MAJOR true, tile row
    i*BLOCK_R + r is word row r, code i (the codes of one word land in different rows, so each thread keeps its
    words' values), and the activation columns are read in that order (tile_rows_to_inputs)."""
    VPW: tl.constexpr = 32 // B
    RUN: tl.constexpr = H // B
    i = tl.arange(0, VPW)
    if CODE_MAJOR:
        w3 = words[None, :, :]
        q = (w3 >> (i * B)[:, None, None]) & ((1 << B) - 1)
        if H != B:
            hq = (w3 >> ((i // RUN) * H)[:, None, None]) & ((1 << H) - 1)
            q = tl.where(sal[None, :, :], hq, q)
        f = (q | MAGIC_BITS).to(tl.float32, bitcast=True)
        w = (f - (zero + MAGIC)[None, :, :]) * scale[None, :, :]
    else:
        w3 = words[:, None, :]
        q = (w3 >> (i * B)[None, :, None]) & ((1 << B) - 1)
        if H != B:
            hq = (w3 >> ((i // RUN) * H)[None, :, None]) & ((1 << H) - 1)
            q = tl.where(sal[:, None, :], hq, q)
        f = (q | MAGIC_BITS).to(tl.float32, bitcast=True)
        w = (f - (zero + MAGIC)[:, None, :]) * scale[:, None, :]
    return tl.reshape(w, (BLOCK_R * VPW, BLOCK_N))


@triton.jit
def tile_rows_to_inputs(r0, B: tl.constexpr, BLOCK_R: tl.constexpr, CODE_MAJOR: tl.constexpr):
    """The input row (activation column) of each row of dequant_tile's tile for word rows r0 .. r0 + BLOCK_R - 1."""
    VPW: tl.constexpr = 32 // B
    t = tl.arange(0, BLOCK_R * VPW)
    if CODE_MAJOR:
        return (r0 + t % BLOCK_R) * VPW + t // BLOCK_R
    return r0 * VPW + t
