"""Decode attention over the paged KV cache: one new query token per sequence attends to that sequence's positions
0 .. pos, read from its blocks. The tensors are server/kv_cache.py's, as `PagedKVCache.layer_tensors` lists them:

    k, v                       [kv_heads, num_blocks, block_size, D] as floats (fp32, fp16), int8 codes, or uint8
                               pairs of int4 codes [.., D / 2] (kernels/kv_quant.py)
    k_scale, v_scale           [kv_heads, num_blocks, block_size] fp16 (int8, int4)
    k_zero, v_zero             the same (int4)
    centers, sinks, rope table int4: the rows' key means mu [rows, kv_heads, D] (a key at position p is stored as
                               k - R(p) mu), their exact position 0 [rows, 2, kv_heads, D] (k, v, Hadamard-rotated),
                               and the RoPE table [D, positions] (row i < D/2: cos of pair i, row D/2 + i: its sin)

`table` [rows, max_blocks] int32 maps a row's i-th block to its pool block. One signature for both kernels:

    o = attention(q, tensors, table, rows, positions)   # q [B, H, D] after RoPE, rows / positions [B] -> [B, H, D]

`decode_attention_reference` gathers the blocks into a dense copy (read_dense, which PagedKVCache.read also uses)
and runs a masked softmax; `kernels/triton_paged_attention.py` reads the blocks in place on a GPU, dequantizing as
it goes. The CPU's native decode layer (kernels/cpu_decode_layer.cpp) does the same inside its layer step.
`choose_decode_attention` picks once, at load. Triton is imported only when the Triton kernel is chosen.
"""
from __future__ import annotations

import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F

from mamp.kernels import kv_quant

Attention = Callable[[torch.Tensor, list, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def kind_of(tensors: list[torch.Tensor]) -> str:
    """The cache's entry kind from its tensors: "auto" (floats: the compute dtype, or fp16), "int8" or "int4"."""
    return {torch.int8: "int8", torch.uint8: "int4"}.get(tensors[0].dtype, "auto")


def rope_at(tab: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The transposed half table [D, max_positions] -> cos, sin [*positions.shape, D] at those positions (each
    pair's value in both halves)."""
    h = tab.shape[0] // 2
    cos, sin = tab[:h, positions].movedim(0, -1), tab[h:, positions].movedim(0, -1)
    return torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)


def read_dense(tensors: list[torch.Tensor], table: torch.Tensor, rows: torch.Tensor, length: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of positions [0, length) of each row: [B, kv_heads, length, D] in `dtype` (a copy; int4
    keys with R(p) mu added back and position 0 from the sinks). Positions a row has not written hold whatever its
    blocks hold: mask them."""
    kind = kind_of(tensors)
    k, v = tensors[0], tensors[1]
    kvh, _, bs = k.shape[:3]
    nb = -(-length // bs)
    idx = table[rows, :nb].long()  # [B, nb]
    b = idx.shape[0]

    def dense(t: torch.Tensor) -> torch.Tensor:  # [KVH, NB, BS, ...] -> [B, KVH, nb * BS, ...]
        g = t[:, idx].transpose(0, 1)
        return g.reshape(b, kvh, nb * bs, *t.shape[3:])[:, :, :length]

    if kind == "auto":
        return dense(k).to(dtype), dense(v).to(dtype)
    meta = [dense(m) for m in tensors[2:6]]
    zk, zv = (meta[2], meta[3]) if kind == "int4" else (None, None)
    keys = kv_quant.dequantize(dense(k), meta[0], zk, kind)
    values = kv_quant.dequantize(dense(v), meta[1], zv, kind)
    if kind == "int4":
        centers, sinks, tab = tensors[6], tensors[7], tensors[8]
        cos, sin = rope_at(tab, torch.arange(length, device=tab.device))
        keys = keys + kv_quant.rope_rotate(centers[rows][:, :, None], cos, sin)
        if length:
            sink = kv_quant.rotate(sinks[rows])  # [B, 2, KVH, D]
            keys[:, :, 0], values[:, :, 0] = sink[:, 0], sink[:, 1]
    return keys.to(dtype), values.to(dtype)


def decode_attention_reference(q: torch.Tensor, tensors: list[torch.Tensor], table: torch.Tensor,
                               rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """q [B, H, D] (after RoPE) attends to positions 0 .. positions[b] of rows[b]: [B, H, D] in q.dtype."""
    length = int(positions.max()) + 1
    keys, values = read_dense(tensors, table, rows, length, q.dtype)
    valid = torch.arange(length, device=q.device)[None] <= positions[:, None]  # [B, L]
    if q.shape[0] > 1:  # never-written positions may hold anything, NaN included
        keys = keys.masked_fill(~valid[:, None, :, None], 0)
        values = values.masked_fill(~valid[:, None, :, None], 0)
    o = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=valid[:, None, None, :],
                                       enable_gqa=True)
    return o[:, :, 0]


def choose_decode_attention(device: torch.device) -> tuple[Attention, str]:
    """The decode attention for this device, and why: the Triton kernel on CUDA where Triton is installed
    (MAMP_TRITON_ATTENTION=0 refuses it), else the reference."""
    import os

    if device.type != "cuda":
        return decode_attention_reference, "reference (not on CUDA)"
    if os.environ.get("MAMP_TRITON_ATTENTION", "1") == "0":
        return decode_attention_reference, "reference (MAMP_TRITON_ATTENTION=0)"
    if importlib.util.find_spec("triton") is None:
        return decode_attention_reference, "reference (triton is not installed)"
    from mamp.kernels.triton_paged_attention import decode_attention_triton

    return decode_attention_triton, "triton"
