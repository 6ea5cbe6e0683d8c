"""Decode-time packed matmul (M <= 16) in Triton: stream the packed words once, split-K over programs.

Each program owns BLOCK_N columns and one of SPLIT_K slices of the word rows. It loads a [BLOCK_R, BLOCK_N] tile of
words (each word exactly once) and accumulates in fp32. M = 1: one FMA per code on the raw code (q, not
(q - zero) * scale), the word's grid applied once per word as scale * (sum q x - zero * sum x), and the products
reduced over rows once at the end. 1 < M <= 16: the tile is dequantized in input-row order and multiplied with
a 16-row activation tile in one tl.dot over all BLOCK_R * 32/b rows.
SPLIT_K > 1 adds the partial sums into an fp32 workspace with atomics; a cast to x.dtype follows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mamp.kernels.packing import PackedWeight
from mamp.kernels.triton_autotune import DiskAutotuner, KernelConfig, dot_in_fp32
from mamp.kernels.triton_decode import (MAGIC, check_launch_args, code_bits, dequant_tile, load_word_rows,
                                        tile_rows_to_inputs)

MAX_M = 16  # rows this kernel serves; PackedLinear sends larger M to the GEMM
DOT_M = 16  # activation tile for 1 < M <= 16 (tl.dot needs 16)


@triton.jit
def packed_gemv_kernel(
    x_ptr, qw_ptr, bm_ptr, sc_ptr, z_ptr, hsc_ptr, hz_ptr, bias_ptr, out_ptr,
    M, N, K, R, stride_xm, stride_xk, stride_om, rows_per_split,
    B: tl.constexpr, H: tl.constexpr, GS: tl.constexpr, SGS: tl.constexpr,
    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, CODE_MAJOR: tl.constexpr,
):
    VPW: tl.constexpr = 32 // B
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    r_begin = pid_k * rows_per_split
    r_end = tl.minimum(r_begin + rows_per_split, R)
    if BLOCK_M == 1:
        acc2 = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(r_begin, r_end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < r_end
        words, sal, scale, zero = load_word_rows(qw_ptr, bm_ptr, sc_ptr, z_ptr, hsc_ptr, hz_ptr, r0, offs_n, mask_n,
                                                 r_end, N, B, GS, SGS, BLOCK_R)
        if BLOCK_M == 1:
            # Per word: scale * (sum_i q_i x_i - zero * sum_i x_i), so the inner loop is one FMA per code.
            t = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
            xsum = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for i in tl.static_range(VPW):
                k = offs_r * VPW + i
                xv = tl.load(x_ptr + k * stride_xk, mask=mask_r & (k < K), other=0.0).to(tl.float32)
                t += (code_bits(words, sal, i, B, H) - MAGIC) * xv[:, None]
                xsum += xv
            acc2 += scale * (t - zero * xsum[:, None])
        else:
            w = dequant_tile(words, sal, scale, zero, B, H, BLOCK_R, BLOCK_N, CODE_MAJOR)  # [BLOCK_K, BLOCK_N] fp32
            offs_k = tile_rows_to_inputs(r0, B, BLOCK_R, CODE_MAJOR)
            xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=mask_m[:, None] & ((offs_k < K) & (offs_k < r_end * VPW))[None, :], other=0.0)
            if DOT_F32:  # full fp32 products, not TF32: fp32 activations ask for fp32 accuracy
                acc = tl.dot(xv.to(tl.float32), w, acc, input_precision="ieee")
            else:
                acc = tl.dot(xv, w.to(xv.dtype), acc)
    if BLOCK_M == 1:
        acc = tl.sum(acc2, axis=0)[None, :]
    if HAS_BIAS:  # added by the first K slice only
        acc += tl.load(bias_ptr + offs_n, mask=mask_n & (offs_n * 0 + pid_k == 0), other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    omask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=omask)
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=omask)


def packed_gemv(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None,
                out: torch.Tensor | None = None, config: KernelConfig | None = None) -> torch.Tensor:
    """y = x W^T + bias for M <= 16 rows of x.

    x: [..., K] fp16/bf16/fp32 (any strides), M = x.numel() / K <= 16
    qweight: [K_pad*b/32, N] int32; bitmap: [ceil(K_pad/128), N] uint8
    scales, zeros: [ceil(K_pad/gs), N] fp16, uint8; hscales, hzeros: [ceil(K_pad/sgs), N] fp16, uint8
    bias: [N] or None; out: [..., N] in x.dtype (overwritten) or None.  Returns [..., N] in x.dtype.
    """
    spec = packed.spec
    k, n = spec.in_features, spec.out_features
    x2, out, out2 = check_launch_args(x, packed, bias, out)
    m = x2.shape[0]
    assert 1 <= m <= MAX_M, f"GEMV serves 1..{MAX_M} rows, got {m}"
    block_m = 1 if m == 1 else DOT_M
    r = spec.qweight_rows

    def launch(cfg: KernelConfig):
        bn, br, split = cfg.blocks["BLOCK_N"], cfg.blocks["BLOCK_R"], cfg.blocks["SPLIT_K"]
        split = max(1, min(split, triton.cdiv(r, br)))
        rows_per_split = triton.cdiv(triton.cdiv(r, split), br) * br
        split = triton.cdiv(r, rows_per_split)
        atomic = split > 1
        dst = torch.zeros(m, n, dtype=torch.float32, device=x.device) if atomic else out2
        grid = (triton.cdiv(n, bn), split)
        packed_gemv_kernel[grid](
            x2, packed.qweight, packed.bitmap, packed.scales, packed.zeros, packed.hscales, packed.hzeros,
            bias if bias is not None else packed.scales, dst,
            m, n, k, r, x2.stride(0), x2.stride(1), dst.stride(0), rows_per_split,
            B=spec.bits, H=spec.salient_bits, GS=spec.group_size, SGS=spec.salient_group_size,
            HAS_BIAS=bias is not None, ATOMIC=atomic, DOT_F32=dot_in_fp32(x.dtype),
            BLOCK_M=block_m, BLOCK_N=bn, BLOCK_R=br, CODE_MAJOR=bool(cfg.blocks.get("CODE_MAJOR", 0)),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if atomic:
            out2.copy_(dst)
        return out

    if config is None:
        key = (f"m{block_m}_n{n}_k{k}_b{spec.bits}_h{spec.salient_bits}_gs{spec.group_size}"
               f"_sgs{spec.salient_group_size}_{str(x.dtype).removeprefix('torch.')}_bias{int(bias is not None)}")
        config = GEMV_TUNER.pick(key, x.device, launch)
    return launch(config)


def _cfg(bn: int, br: int, split: int, warps: int = 4, stages: int = 2, code_major: int = 0) -> KernelConfig:
    return KernelConfig(blocks={"BLOCK_N": bn, "BLOCK_R": br, "SPLIT_K": split, "CODE_MAJOR": code_major},
                        num_warps=warps, num_stages=stages)


# Curated: wide column tiles for big N, split-K for short-and-wide layers where N alone leaves SMs idle (an H200
# has 132 SMs: 4096 columns in tiles of 128 make only 32 programs); short BLOCK_R for 1 < M <= 16, whose
# dequantized tile holds BLOCK_R * 32/b rows. CODE_MAJOR (M > 1 only) as in the GEMM.
GEMV_CONFIGS = [
    _cfg(128, 16, 1),
    _cfg(256, 16, 1),
    _cfg(128, 16, 4),
    _cfg(64, 32, 8),
    _cfg(64, 16, 16),
    _cfg(64, 8, 16),
    _cfg(128, 8, 8),
    _cfg(256, 32, 2, warps=8),
    _cfg(32, 16, 8),
    _cfg(64, 16, 4),
    _cfg(128, 16, 8, warps=8),
    _cfg(64, 8, 16, code_major=1),
    _cfg(128, 8, 8, code_major=1),
]
GEMV_TUNER = DiskAutotuner("packed_gemv", GEMV_CONFIGS)
