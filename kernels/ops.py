"""The kernels as PyTorch custom ops: torch.ops.mamp.<name>, callable from torch.compile'd code, inside CUDA
graphs and from other serving engines. Each returns a new tensor (no out=) and has a fake (meta) kernel that
gives the output's shape and dtype without computing it.

    torch.ops.mamp.packed_linear_cpu(x, qweight, bitmap, scales, zeros, hscales, hzeros, bias,
                                     bits, salient_bits, group_size, salient_group_size, small_m, scratch_bytes)
    torch.ops.mamp.packed_linear_int8_cpu(x, qweight, bitmap, scales, zeros, hscales, hzeros, bias,
                                          bits, salient_bits, group_size, salient_group_size, act_block, small_m,
                                          scratch_bytes)
    torch.ops.mamp.half_linear_cpu(x, weight, bias, small_m, upcast_m, scratch_bytes)
    torch.ops.mamp.packed_linear_triton(x, qweight, bitmap, scales, zeros, hscales, hzeros, bias,
                                        bits, salient_bits, group_size, salient_group_size, in_features)
    torch.ops.mamp.packed_rows(ids, qweight, bitmap, scales, zeros, hscales, hzeros,
                               bits, salient_bits, group_size, salient_group_size, in_features, tiled)
    torch.ops.mamp.packed_rows_cpu(ids, qweight, bitmap, scales, zeros, hscales, hzeros,
                                   bits, salient_bits, group_size, salient_group_size, in_features)

x: [..., K] in any float dtype; the result is [..., N] in x's dtype. packed_rows is the embedding lookup of a
packed, tied lm_head: columns `ids` of the packed weight (row-major [rows, N] or column-tiled [N/16, rows, 16]:
tiled) dequantized, [len(ids), K] float32, on any device. The CPU ops are defined in C++
(kernels/cpu_matmul.cpp) and exist once the extension is loaded (`load_cpu_ops()`; building it takes a minute
the first time, then it is cached); the Triton op is defined here and runs on CUDA tensors.
"""
from __future__ import annotations

import threading

import torch

from mamp.kernels import cpu_matmul
from mamp.kernels.cpu_layout import out_features
from mamp.kernels.packing import PackedWeight, PackSpec, dequantize

GEMV_MAX_M = 16  # rows the Triton GEMV serves; larger M goes to the GEMM

_lock = threading.Lock()
_cpu_fakes_registered = False


@torch.library.custom_op("mamp::packed_linear_triton", mutates_args=(), device_types="cuda")
def packed_linear_triton(x: torch.Tensor, qweight: torch.Tensor, bitmap: torch.Tensor, scales: torch.Tensor,
                         zeros: torch.Tensor, hscales: torch.Tensor, hzeros: torch.Tensor,
                         bias: torch.Tensor | None, bits: int, salient_bits: int, group_size: int,
                         salient_group_size: int, in_features: int) -> torch.Tensor:
    spec = PackSpec(in_features, qweight.shape[1], bits, salient_bits, group_size, salient_group_size)
    packed = PackedWeight(spec, qweight, bitmap, scales, zeros, hscales, hzeros)
    m = x.numel() // max(1, x.shape[-1])
    if 1 <= m <= GEMV_MAX_M:
        from mamp.kernels.triton_gemv import packed_gemv
        return packed_gemv(x, packed, bias)
    from mamp.kernels.triton_gemm import packed_gemm
    return packed_gemm(x, packed, bias)


@packed_linear_triton.register_fake
def _packed_linear_triton_fake(x, qweight, bitmap, scales, zeros, hscales, hzeros, bias, bits, salient_bits,
                               group_size, salient_group_size, in_features):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


@torch.library.custom_op("mamp::packed_rows", mutates_args=())
def packed_rows(ids: torch.Tensor, qweight: torch.Tensor, bitmap: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, hscales: torch.Tensor, hzeros: torch.Tensor, bits: int, salient_bits: int,
                group_size: int, salient_group_size: int, in_features: int, tiled: bool) -> torch.Tensor:
    flat = ids.reshape(-1).long()
    if flat.numel() == 0:
        return torch.zeros(0, in_features, device=ids.device)

    def columns(t: torch.Tensor) -> torch.Tensor:
        return (t[flat // 16, :, flat % 16].t() if tiled else t[:, flat]).contiguous()

    spec = PackSpec(in_features, flat.numel(), bits, salient_bits, group_size, salient_group_size)
    return dequantize(PackedWeight(spec, *(columns(t) for t in (qweight, bitmap, scales, zeros, hscales, hzeros))))


@packed_rows.register_fake
def _packed_rows_fake(ids, qweight, bitmap, scales, zeros, hscales, hzeros, bits, salient_bits, group_size,
                      salient_group_size, in_features, tiled):
    return qweight.new_empty((ids.numel(), in_features), dtype=torch.float32)


def rows(ids: torch.Tensor, packed) -> torch.Tensor:
    """packed_rows on a layer's packed tensors (kernels.packing.PackedTensors), row-major or column-tiled (told apart
    by qweight's rank, 2 or 3). On the CPU with the extension loaded, the C++ lookup packed_rows_cpu (the same
    values, bit for bit)."""
    s = packed.spec
    args = (ids, packed.qweight, packed.bitmap, packed.scales, packed.zeros, packed.hscales, packed.hzeros, s.bits,
            s.salient_bits, s.group_size, s.salient_group_size, s.in_features)
    if packed.qweight.device.type == "cpu" and _cpu_fakes_registered:
        return torch.ops.mamp.packed_rows_cpu(*args)
    return torch.ops.mamp.packed_rows(*args, packed.qweight.dim() == 3)


def _packed_linear_cpu_fake(x, qweight, bitmap, scales, zeros, hscales, hzeros, bias, bits, salient_bits,
                            group_size, salient_group_size, small_m, scratch_bytes):
    return x.new_empty((*x.shape[:-1], out_features(qweight)))


def _packed_linear_int8_cpu_fake(x, qweight, bitmap, scales, zeros, hscales, hzeros, bias, bits, salient_bits,
                                 group_size, salient_group_size, act_block, small_m, scratch_bytes):
    return x.new_empty((*x.shape[:-1], out_features(qweight)))


def _half_linear_cpu_fake(x, weight, bias, small_m, upcast_m, scratch_bytes):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _packed_rows_cpu_fake(ids, qweight, bitmap, scales, zeros, hscales, hzeros, bits, salient_bits, group_size,
                          salient_group_size, in_features):
    return qweight.new_empty((ids.numel(), in_features), dtype=torch.float32)


def load_cpu_ops() -> bool:
    """Load (building if needed) the C++ extension that defines torch.ops.mamp.*_cpu and register their fake
    kernels. False if the extension cannot be built (kernels.cpu_matmul.ext_error() says why)."""
    global _cpu_fakes_registered
    if cpu_matmul.load_extension() is None:
        return False
    with _lock:
        if not _cpu_fakes_registered:
            torch.library.register_fake("mamp::packed_linear_cpu")(_packed_linear_cpu_fake)
            torch.library.register_fake("mamp::packed_linear_int8_cpu")(_packed_linear_int8_cpu_fake)
            torch.library.register_fake("mamp::half_linear_cpu")(_half_linear_cpu_fake)
            torch.library.register_fake("mamp::packed_rows_cpu")(_packed_rows_cpu_fake)
            _cpu_fakes_registered = True
    return True


def packed_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch.ops.mamp.packed_linear_<device> on a PackedWeight, or on the CPU a kernels.cpu_layout.TiledWeight
    (the Kernel functions of kernels/dispatch.py)."""
    s = packed.spec
    if x.device.type == "cuda":
        return torch.ops.mamp.packed_linear_triton(x, packed.qweight, packed.bitmap, packed.scales, packed.zeros,
                                                   packed.hscales, packed.hzeros, bias, s.bits, s.salient_bits,
                                                   s.group_size, s.salient_group_size, s.in_features)
    if x.shape[-1] != s.in_features:  # the C++ kernel checks shapes too; this message names the layer's sizes
        raise ValueError(f"x has {x.shape[-1]} features, layer expects {s.in_features}")
    return torch.ops.mamp.packed_linear_cpu(x, packed.qweight, packed.bitmap, packed.scales, packed.zeros,
                                            packed.hscales, packed.hzeros, bias, s.bits, s.salient_bits,
                                            s.group_size, s.salient_group_size, cpu_matmul.SMALL_M,
                                            cpu_matmul.SCRATCH_BYTES)


def packed_linear_int8(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch.ops.mamp.packed_linear_int8_cpu on a PackedWeight or TiledWeight: int8 activations (blocks of
    cpu_matmul.ACT_BLOCK inputs) x codes in integer instructions for M <= cpu_matmul.INT8_MAX_M and h = b;
    otherwise the float kernel."""
    s = packed.spec
    if x.shape[-1] != s.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, layer expects {s.in_features}")
    return torch.ops.mamp.packed_linear_int8_cpu(x, packed.qweight, packed.bitmap, packed.scales, packed.zeros,
                                                 packed.hscales, packed.hzeros, bias, s.bits, s.salient_bits,
                                                 s.group_size, s.salient_group_size, cpu_matmul.ACT_BLOCK,
                                                 cpu_matmul.INT8_MAX_M, cpu_matmul.SCRATCH_BYTES)
