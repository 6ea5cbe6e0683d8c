"""Pure-torch oracle for every packed matmul kernel: dequantize, then multiply in fp32."""
from __future__ import annotations

import torch

from mamp.kernels.packing import PackedWeight, dequantize


def packed_matmul_reference(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + bias.

    x: [..., K] any float dtype (any strides); packed: W [N, K]; bias: [N] or None.
    Returns [..., N] in x.dtype, accumulated in fp32.
    """
    k = packed.spec.in_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, layer expects {k}")
    w = dequantize(packed)
    y = x.reshape(-1, k).float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], packed.spec.out_features).to(x.dtype)
