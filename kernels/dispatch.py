"""Which kernel multiplies a packed layer on which device, and why the others cannot.

Order: CUDA -> Triton (GEMV for M <= 16, GEMM above); CPU -> the C++ extension (or its torch twin); anything
else -> the pure-torch reference. Every path dequantizes transiently at most; none keeps a weight copy.
"""
from __future__ import annotations

import importlib.util

import torch

from kernels.cpu_matmul import packed_matmul_cpu
from kernels.packing import PackedWeight, PackSpec
from kernels.reference import packed_matmul_reference

GEMV_MAX_M = 16
INT32_MAX = 2**31 - 1


def can_implement(spec: PackSpec, device: torch.device | str) -> tuple[bool, str]:
    """(ok, reason): whether a fast kernel (not the reference) serves this layer on this device."""
    device = torch.device(device)
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
        if max(spec.qweight_rows, spec.padded_in) * spec.out_features > INT32_MAX:
            return False, "layer too large for the kernels' int32 offsets"
        return True, "triton"
    if device.type == "cpu":
        return True, "cpu"
    return False, f"no packed kernel for device type {device.type!r}; using the reference"


def packed_matmul(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + bias on x's device with the best kernel that can serve it. x: [..., K]; returns [..., N].

    Under autograd (x needs a gradient) the differentiable reference runs instead: the kernels write into
    preallocated outputs, which autograd cannot trace. Inference (no_grad / inference_mode) never sees this.
    """
    if x.requires_grad and torch.is_grad_enabled():
        return packed_matmul_reference(x, packed, bias)
    if x.device.type == "cpu":  # the common serving case first: no per-call checks beyond the kernel's own
        return packed_matmul_cpu(x, packed, bias)
    ok, _ = can_implement(packed.spec, x.device)
    if not ok:
        return packed_matmul_reference(x, packed, bias)
    if x.device.type == "cuda":
        m = x.numel() // max(1, x.shape[-1])
        if 1 <= m <= GEMV_MAX_M:
            from kernels.triton_gemv import packed_gemv
            return packed_gemv(x, packed, bias)
        from kernels.triton_gemm import packed_gemm
        return packed_gemm(x, packed, bias)
    return packed_matmul_reference(x, packed, bias)
