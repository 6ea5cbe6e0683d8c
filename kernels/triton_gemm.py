"""Prefill packed matmul (large M) in Triton: a tiled GEMM that dequantizes weight tiles in registers.

Program (pid_m, pid_n) owns a [BLOCK_M, BLOCK_N] output tile. Per step it loads BLOCK_R word rows x BLOCK_N
columns (each word once), dequantizes them in input-row order into a [BLOCK_R * 32/b, BLOCK_N] weight tile and
multiplies it with the matching contiguous [BLOCK_M, BLOCK_R * 32/b] activation tile in one tl.dot on the tensor
cores, accumulating in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mamp.kernels.packing import PackedWeight
from mamp.kernels.triton_autotune import DiskAutotuner, KernelConfig, dot_in_fp32
from mamp.kernels.triton_decode import check_launch_args, dequant_tile, load_word_rows, tile_rows_to_inputs

GROUP_M = 8  # program-id swizzle: neighbouring programs share weight tiles in L2


@triton.jit
def packed_gemm_kernel(
    x_ptr, qw_ptr, bm_ptr, sc_ptr, z_ptr, hsc_ptr, hz_ptr, bias_ptr, out_ptr,
    M, N, K, R, stride_xm, stride_xk, stride_om,
    B: tl.constexpr, H: tl.constexpr, GS: tl.constexpr, SGS: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP: tl.constexpr,
    CODE_MAJOR: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * num_n
    first_m = (pid // per_group) * GROUP
    group_m = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        words, sal, scale, zero = load_word_rows(qw_ptr, bm_ptr, sc_ptr, z_ptr, hsc_ptr, hz_ptr, r0, offs_n, mask_n,
                                                 R, N, B, GS, SGS, BLOCK_R)
        w = dequant_tile(words, sal, scale, zero, B, H, BLOCK_R, BLOCK_N, CODE_MAJOR)  # [BLOCK_K, BLOCK_N] fp32
        offs_k = tile_rows_to_inputs(r0, B, BLOCK_R, CODE_MAJOR)
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        if DOT_F32:  # full fp32 products, not TF32: fp32 activations ask for fp32 accuracy
            acc = tl.dot(xv.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(xv, w.to(xv.dtype), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def m_bucket(m: int) -> int:
    """Autotune key for M: the next power of two, from 32 up to 4096."""
    return min(4096, max(32, triton.next_power_of_2(m)))


def packed_gemm(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None,
                out: torch.Tensor | None = None, config: KernelConfig | None = None) -> torch.Tensor:
    """y = x W^T + bias for any M (meant for M > 16).

    x: [..., K] fp16/bf16/fp32 (any strides)
    qweight: [K_pad*b/32, N] int32; bitmap: [ceil(K_pad/128), N] uint8
    scales, zeros: [ceil(K_pad/gs), N] fp16, uint8; hscales, hzeros: [ceil(K_pad/sgs), N] fp16, uint8
    bias: [N] or None; out: [..., N] in x.dtype (overwritten) or None.  Returns [..., N] in x.dtype.
    """
    spec = packed.spec
    k, n = spec.in_features, spec.out_features
    x2, out, out2 = check_launch_args(x, packed, bias, out)
    m = x2.shape[0]
    if m == 0:
        return out

    def launch(cfg: KernelConfig):
        bm, bn, br = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"], cfg.blocks["BLOCK_R"]
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        packed_gemm_kernel[grid](
            x2, packed.qweight, packed.bitmap, packed.scales, packed.zeros, packed.hscales, packed.hzeros,
            bias if bias is not None else packed.scales, out2,
            m, n, k, spec.qweight_rows, x2.stride(0), x2.stride(1), out2.stride(0),
            B=spec.bits, H=spec.salient_bits, GS=spec.group_size, SGS=spec.salient_group_size,
            HAS_BIAS=bias is not None, DOT_F32=dot_in_fp32(x.dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, GROUP=GROUP_M, CODE_MAJOR=bool(cfg.blocks.get("CODE_MAJOR", 0)),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return out

    if config is None:
        key = (f"m{m_bucket(m)}_n{n}_k{k}_b{spec.bits}_h{spec.salient_bits}_gs{spec.group_size}"
               f"_sgs{spec.salient_group_size}_{str(x.dtype).removeprefix('torch.')}_bias{int(bias is not None)}")
        config = GEMM_TUNER.pick(key, x.device, launch)
    return launch(config)


def _cfg(bm: int, bn: int, br: int, warps: int, stages: int, code_major: int = 0) -> KernelConfig:
    return KernelConfig(blocks={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_R": br, "CODE_MAJOR": code_major},
                        num_warps=warps, num_stages=stages)


# Curated: a K step is BLOCK_R * 32/b input rows (BLOCK_R = 8: 128 rows at b = 2, 64 at b = 4). Configs whose
# tiles overflow shared memory fail to compile and the tuner skips them. Dequantizing costs ALU work per weight
# and program, the MMA per weight and row of the tile: BLOCK_M = 256 halves the former's share. CODE_MAJOR
# orders the dequantized tile by code (see dequant_tile); which order converts to the MMA layout more cheaply is
# left to the tuner.
GEMM_CONFIGS = [
    _cfg(128, 128, 8, 8, 3),
    _cfg(128, 256, 8, 8, 3),
    _cfg(64, 128, 8, 4, 4),
    _cfg(128, 128, 16, 8, 2),
    _cfg(64, 256, 16, 8, 2),
    _cfg(64, 64, 16, 4, 3),
    _cfg(32, 128, 8, 4, 4),
    _cfg(256, 128, 8, 8, 3),
    _cfg(128, 128, 8, 8, 3, code_major=1),
    _cfg(128, 256, 8, 8, 3, code_major=1),
    _cfg(128, 128, 16, 8, 2, code_major=1),
    _cfg(256, 128, 8, 8, 3, code_major=1),
]
GEMM_TUNER = DiskAutotuner("packed_gemm", GEMM_CONFIGS)
