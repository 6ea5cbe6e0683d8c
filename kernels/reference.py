"""Pure-torch oracles for the packed matmul kernels: dequantize, then multiply (the integer CPU kernel's oracle
quantizes the activations first, as that kernel does)."""
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


def quantize_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row and block of `block` inputs, as the integer CPU kernel quantizes them.

    x: [M, K] any float dtype. Returns (q [M, K] int8 in -127..127, d [M, ceil(K/block)] fp32) with
    x ~ q * d (d = max|x| / 127 over the block; q = round-half-even(x * 127 / max|x|); 0 where the block is 0).
    """
    m, k = x.shape
    nblk = -(-k // block)
    xf = torch.zeros(m, nblk * block, dtype=torch.float32)
    xf[:, :k] = x.float()
    xb = xf.view(m, nblk, block)
    amax = xb.abs().amax(dim=-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8).view(m, -1)[:, :k]
    return q, amax / 127.0


def packed_matmul_int8_reference(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None,
                                 act_block: int = 128) -> torch.Tensor:
    """The integer kernel's contract: y = (x quantized to int8 per block of act_block inputs) W^T + bias.

    Same arguments as packed_matmul_reference plus act_block; computed in float64 from the dequantized
    activations and weights, returned in x.dtype.
    """
    k = packed.spec.in_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, layer expects {k}")
    x2 = x.reshape(-1, k)
    q, d = quantize_activations(x2, act_block)
    xq = q.double() * d.double().repeat_interleave(act_block, dim=1)[:, :k]
    y = xq @ dequantize(packed).double().t()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], packed.spec.out_features).to(x.dtype)
