"""Quantized KV-cache entries: the pure-torch reference of what the native decode layer
(kernels/cpu_decode_layer.cpp) writes and reads, bit for bit.

Each token's key (or value) of one KV head, a vector of head_dim numbers, is quantized on its own when it is
written; no calibration, no later pass. It is first rotated by an orthonormal Hadamard transform (blocks of the
largest power of two dividing head_dim; QuaRot's idea): the rotation spreads a few outlier channels over all of
them, so one scale per token fits them all (measured on SmolLM2-135M, 3 windows of 2048: int8 perplexity +0.59%
without it, +0.12% with it; docs/RESULTS.md). Attention needs no inverse for keys (q . k = Hq . Hk: the query is
rotated once) and one for the output (sum p Hv = H sum p v).

With x the rotated vector:

    int8  symmetric: scale = absmax / 127 (stored fp16), code = round(x / scale) in [-127, 127] (int8),
          x ~ code * scale
    int4  asymmetric over the whole head: zero = min (fp16), scale = (max - min) / 15 (fp16),
          code = round((x - zero) / scale) in [0, 15], two codes per byte (element i in the low
          nibble, i + D/2 in the high one: both halves unpack with contiguous loads), x ~ code * scale + zero

int4 keys are centered first (KIVI's observation: keys have channels with large offsets, which a per-token grid
wastes its levels on; KIVI quantizes keys per channel, which needs groups of tokens). Here each sequence has a
per-channel key mean mu [kv_heads, D], taken before RoPE from its first chunk (positions 1 .. 63: the first
position, the attention sink, is an outlier), and a key at position p is stored as k - R(p) mu (R(p) the RoPE
rotation of that position, so the offset follows the key's own rotation). Attention adds q . R(p) mu back to each
score exactly, so mu only changes what the 4 bits have to cover: measured on SmolLM2-135M, 8 windows of 2048,
int4 keys and values +6.1 % perplexity without it, +3.1 % with it (docs/RESULTS.md). No calibration; mu
costs kv_heads x D fp32 per row and layer, not per token. The cache also keeps each sequence's first position (the
attention sink, an outlier that draws much of the attention) exact, per row and layer, not in 4 bits: +3.1 % ->
+1.7 % on the same windows (server/kv_cache.py).

The stored fp16 scale and zero are the ones used to compute the codes (the float value of the fp16). Rounding is
to nearest, ties to even (torch.round, C's nearbyint). A zero scale (a constant vector) gives codes 0.

Per token and head: int8 is head_dim + 2 bytes, int4 head_dim / 2 + 4, against 2 * head_dim for 16-bit.
"""
from __future__ import annotations

import math

import torch

# auto: 16-bit (server/kv_cache.resolve_kind); fp32 and fp16: entries as they are, fp16 rounded to half precision
KINDS = ("auto", "fp32", "fp16", "int8", "int4")
STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8, "int4": torch.uint8}


def code_dim(kind: str, head_dim: int) -> int:
    """Elements per token and head in the code tensor."""
    if kind == "int4":
        if head_dim % 2:
            raise ValueError(f"int4 KV cache needs an even head_dim, got {head_dim}")
        return head_dim // 2
    return head_dim


def rotate(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal Hadamard transform of x [..., D] fp32 in blocks of P = the largest power of two dividing D
    (its own inverse), as butterflies in the order the native code does them, so the results are bit for bit
    the same."""
    d = x.shape[-1]
    p = d & -d
    y = x.float().reshape(-1, d // p, p)
    h = 1
    while h < p:
        y = y.reshape(y.shape[0], d // p, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(-1, d // p, p)
        h *= 2
    return (y * float(1.0 / math.sqrt(p))).reshape(x.shape)


CENTER_POSITIONS = 64  # int4 key centering: mu from positions 1 .. CENTER_POSITIONS - 1 of the first chunk


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """R(p) x in HF's rotate-half convention: x * cos + (-x[D/2:], x[:D/2]) * sin (sin negated: R(-p) x)."""
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin


def key_center(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """k [kv_heads, T, D]: a sequence's keys (after RoPE) at positions 0 .. T - 1, cos, sin [T, D] their RoPE
    tables -> mu [kv_heads, D] fp32, the mean of R(-p) k over positions 1 .. min(T, CENTER_POSITIONS) - 1 (zeros
    when T < 2). Any mu is exact (attention adds R(p) mu back); this one makes the stored keys small."""
    n = min(k.shape[1], CENTER_POSITIONS)
    if n < 2:
        return torch.zeros(k.shape[0], k.shape[-1], dtype=torch.float32, device=k.device)
    return rope_rotate(k[:, 1:n].float(), cos[1:n].float(), -sin[1:n].float()).mean(dim=1)


def quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [..., D] float -> (codes [..., D] int8 | [..., D/2] uint8, scale [...] fp16, zero [...] fp16 | None), the
    codes of rotate(x)."""
    x = rotate(x)
    if kind == "int8":
        scale = (x.abs().amax(-1) / 127).half()
        s = scale.float()[..., None]
        codes = torch.where(s > 0, torch.round(x / torch.where(s > 0, s, 1)), 0).clamp_(-127, 127)
        return codes.to(torch.int8), scale, None
    if kind == "int4":
        lo, hi = x.amin(-1), x.amax(-1)
        zero = lo.half()
        scale = ((hi - lo) / 15).half()
        s, z = scale.float()[..., None], zero.float()[..., None]
        codes = torch.where(s > 0, torch.round((x - z) / torch.where(s > 0, s, 1)), 0).clamp_(0, 15).to(torch.uint8)
        half = codes.shape[-1] // 2
        return codes[..., :half] | (codes[..., half:] << 4), scale, zero
    raise ValueError(f"no quantized KV kind {kind!r}; choose int8 or int4")


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, kind: str,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of quantize: [..., D] in `dtype` (rotated back)."""
    s = scale.float()[..., None]
    if kind == "int8":
        return rotate(codes.float() * s).to(dtype)
    if kind == "int4":
        full = torch.cat(((codes & 15).float(), (codes >> 4).float()), dim=-1)
        return rotate(full * s + zero.float()[..., None]).to(dtype)
    raise ValueError(f"no quantized KV kind {kind!r}; choose int8 or int4")
