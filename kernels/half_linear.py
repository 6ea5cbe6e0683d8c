"""Linear and embedding layers that keep their weight in 16 bits (bf16 or fp16) while the model computes in fp32.

Use case: a quantized checkpoint keeps its untouched embedding table / tied lm_head in bf16 (49152 x 576 for
SmolLM2). A CPU server computing in fp32 must not upcast that table (twice the memory), and the lm_head matmul
at decode (M = 1..16 rows) is memory-bound: reading 16-bit weights makes it faster than an fp32 nn.Linear.

    half_matmul(x, weight, bias=None, out=None) -> y = x W^T + bias, W [N, K] bf16/fp16, fp32 accumulation.
        CPU: the C++ extension (kernels/cpu_half_matmul.cpp, built with kernels/cpu_matmul.py's loader): decode
        (M <= SMALL_M) converts W 8 values at a time in registers / a small per-tile buffer, never as a whole;
        prefill upcasts blocks of W rows into a bounded scratch (SCRATCH_BYTES) and calls BLAS per block. Without
        the extension: half_matmul_torch (blockwise upcast + addmm, never a full fp32 copy either).
        CUDA: torch.nn.functional.linear in the weight's dtype (tensor cores), cast back to x's dtype.
    half_matmul_reference(x, weight, bias=None): the fp32 oracle (makes a full fp32 copy: tests only).
    HalfLinear / HalfEmbedding: nn.Modules holding the 16-bit weight as a Parameter(requires_grad=False).

Tied embeddings: both modules accept an existing Parameter and keep it (no copy), so one 16-bit table serves
the input embedding and the lm_head:

    emb = HalfEmbedding.from_embedding(model.model.embed_tokens, dtype=torch.bfloat16)  # one bf16 copy
    head = HalfLinear(emb.weight)              # the same Parameter object: head.weight is emb.weight
    model.model.embed_tokens, model.lm_head = emb, head

Module.float() / .to(torch.float32) / .double() leave these weights in 16 bits (see `_Keep16Bit`); a move to
another device and bf16 <-> fp16 conversions still apply.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mamp.kernels import cpu_matmul
from mamp.kernels.packing import aligned, is_aligned

HALF_DTYPES = (torch.bfloat16, torch.float16)
SMALL_M = cpu_matmul.SMALL_M  # streaming kernel up to this many rows of x; above, upcast row blocks + BLAS
UPCAST_M = 1  # streaming: from this M on, each 12-row tile of W is upcast to fp32 in L1 first (measured faster)
SCRATCH_BYTES = cpu_matmul.SCRATCH_BYTES  # prefill / torch fallback: fp32 bytes of W upcast at a time


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight: expected [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, layer expects {k}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias: expected shape ({n},), got {tuple(bias.shape)}")
    if out is not None and (out.shape != (*x.shape[:-1], n) or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"out: expected contiguous {x.dtype} {(*x.shape[:-1], n)}, got {out.dtype} {tuple(out.shape)}")


def _rows(t: torch.Tensor) -> int:
    """Rows of t viewed as [rows, last dim] (explicit: reshape(-1, 0) is ambiguous)."""
    return math.prod(t.shape[:-1])


def half_matmul_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + bias computed in fp32 from a full fp32 copy of W (the oracle). Returns [..., N] in x.dtype."""
    _check_args(x, weight, bias, None)
    n, k = weight.shape
    y = x.reshape(_rows(x), k).float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def half_matmul_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      out: torch.Tensor | None = None, block_bytes: int = SCRATCH_BYTES) -> torch.Tensor:
    """Pure-torch path (the fallback, any device): upcast blocks of W rows (block_bytes of fp32 at a time) and
    addmm each into its columns of y. Same contract as half_matmul."""
    _check_args(x, weight, bias, out)
    n, k = weight.shape
    xf = x.reshape(_rows(x), k).float()
    y = torch.empty(xf.shape[0], n, dtype=torch.float32, device=x.device)
    nb = max(1, block_bytes // (4 * max(k, 1)))
    for n0 in range(0, n, nb):
        n1 = min(n0 + nb, n)
        wb = weight[n0:n1].float().t()
        y[:, n0:n1] = torch.mm(xf, wb) if bias is None else torch.addmm(bias[n0:n1].float(), xf, wb)
    y = y.view(*x.shape[:-1], n).to(x.dtype)
    return y if out is None else out.copy_(y)


def _half_matmul_cpu(x, weight, bias, out, small_m, upcast_m, scratch_bytes):
    ext = cpu_matmul._ext if cpu_matmul._ext is not None else cpu_matmul.load_extension()
    if ext is None or weight.dtype not in HALF_DTYPES or not weight.is_contiguous():
        return half_matmul_torch(x, weight, bias, out, scratch_bytes)
    _check_args(x, weight, bias, out)
    if out is None:  # the registered op (kernels/ops.py), as torch.compile and other engines see it
        return torch.ops.mamp.half_linear_cpu(x, weight, bias, small_m, upcast_m, scratch_bytes)
    n, k = weight.shape
    m = _rows(x)
    ext.half_linear(x.reshape(m, k), weight, bias, out.view(m, n), small_m, upcast_m, scratch_bytes)
    return out


class _HalfMatmulFn(torch.autograd.Function):
    """half_matmul under autograd: the kernels' outputs carry no graph. Backward never upcasts W whole either."""

    @staticmethod
    def forward(ctx, x, weight, bias, small_m, upcast_m, scratch_bytes):
        ctx.save_for_backward(x, weight, bias)
        ctx.scratch_bytes = scratch_bytes
        return _half_matmul_cpu(x, weight, bias, None, small_m, upcast_m, scratch_bytes)

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias = ctx.saved_tensors
        n, k = weight.shape
        g = gy.reshape(_rows(gy), n).float()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # dL/dx = gy W, W upcast one block of rows at a time
            gx = torch.zeros(g.shape[0], k, dtype=torch.float32, device=g.device)
            nb = max(1, ctx.scratch_bytes // (4 * max(k, 1)))
            for n0 in range(0, n, nb):
                gx.addmm_(g[:, n0:n0 + nb], weight[n0:n0 + nb].float())
            gx = gx.view(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = (g.t() @ x.reshape(_rows(x), k).float()).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            gb = g.sum(0).to(bias.dtype)
        return gx, gw, gb, None, None, None


def half_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                out: torch.Tensor | None = None, *, small_m: int = SMALL_M, upcast_m: int = UPCAST_M,
                scratch_bytes: int = SCRATCH_BYTES) -> torch.Tensor:
    """y = x W^T + bias, same contract as kernels.reference.packed_matmul_reference.

    x: [..., K] fp32/bf16/fp16, any strides; weight: [N, K] bf16 or fp16 (nn.Linear layout; another float dtype
    works through the torch path); bias: [N] any float dtype, or None; out: optional contiguous [..., N] in
    x.dtype, fully overwritten. Returns [..., N] in x.dtype, accumulated in fp32 (on CUDA: F.linear in the
    weight's dtype). small_m / upcast_m / scratch_bytes tune the CPU kernel (see the module constants).
    Differentiable w.r.t. x, weight and bias when autograd asks for it (then `out` is not allowed).
    """
    if x.device.type == "cuda":
        b = None if bias is None else bias.to(weight.dtype)
        y = F.linear(x.to(weight.dtype), weight, b).to(x.dtype)
        if out is None:
            return y
        _check_args(x, weight, bias, out)
        return out.copy_(y)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        if out is not None:
            raise RuntimeError("half_matmul: out= does not support automatic differentiation")
        if x.device.type != "cpu":
            return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
        return _HalfMatmulFn.apply(x, weight, bias, small_m, upcast_m, scratch_bytes)
    if x.device.type == "cpu":
        return _half_matmul_cpu(x, weight, bias, out, small_m, upcast_m, scratch_bytes)
    return half_matmul_torch(x, weight, bias, out, scratch_bytes)


def _as_weight(weight: torch.Tensor) -> nn.Parameter:
    """A 16-bit Parameter(requires_grad=False): an existing aligned Parameter is kept as is (shared), a tensor
    wrapped."""
    if weight.dtype not in HALF_DTYPES:
        raise ValueError(f"weight must be bf16 or fp16, got {weight.dtype} (convert it first, e.g. from_linear)")
    if isinstance(weight, nn.Parameter) and is_aligned(weight):
        weight.requires_grad_(False)
        return weight
    # A CPU table off a cache line (as read from a safetensors file) is copied once onto one: the GEMV streams it.
    return nn.Parameter(aligned(weight.detach()), requires_grad=False)


class _Keep16Bit(nn.Module):
    """Module.float() / .double() / .to(torch.float32) would upcast the 16-bit weight (the memory this class
    exists to save): _apply keeps 16-bit floating tensors in their dtype when the conversion would widen them to
    fp32/fp64, and still applies device moves. bf16 <-> fp16 conversions go through unchanged."""

    def _apply(self, fn, recurse=True):
        def keep(t: torch.Tensor) -> torch.Tensor:
            if t.dtype in HALF_DTYPES:
                probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))  # where and what fn would make t
                if probe.dtype in (torch.float32, torch.float64):
                    return t.to(device=probe.device)
            return fn(t)

        return super()._apply(keep, recurse)


class HalfLinear(_Keep16Bit):
    """nn.Linear(in_features, out_features) whose weight [out, in] stays bf16/fp16; forward = half_matmul.

    HalfLinear(weight, bias=None): weight [N, K] bf16/fp16 (a Parameter is shared, not copied: pass
    `emb.weight` of a HalfEmbedding to tie an lm_head to the input embedding); bias [N] in any float dtype
    (kept as given) or None. Outputs follow the input's dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = _as_weight(weight)
        self.out_features, self.in_features = self.weight.shape
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"bias: expected shape ({self.out_features},), got {tuple(bias.shape)}")
        self.bias = None if bias is None else (
            bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach(), requires_grad=False))

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16) -> "HalfLinear":
        """A copy of linear's weight in `dtype` (bf16/fp16); the bias keeps its dtype."""
        if dtype not in HALF_DTYPES:
            raise ValueError(f"dtype must be bf16 or fp16, got {dtype}")
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(linear.weight.detach().to(dtype, copy=True), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return half_matmul(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight_dtype={self.weight.dtype}")


class HalfEmbedding(_Keep16Bit):
    """nn.Embedding whose table [num_embeddings, embedding_dim] stays bf16/fp16; forward returns the looked-up
    rows upcast (exactly) to compute_dtype.

    HalfEmbedding(weight, compute_dtype=torch.float32, padding_idx=None): weight as for HalfLinear (a Parameter
    is shared). padding_idx is recorded like nn.Embedding's (it only affects gradients).
    """

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype = torch.float32,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.weight = _as_weight(weight)
        self.num_embeddings, self.embedding_dim = self.weight.shape
        if padding_idx is not None and padding_idx < 0:
            padding_idx += self.num_embeddings
        self.padding_idx = padding_idx
        self.compute_dtype = compute_dtype

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, dtype: torch.dtype = torch.bfloat16,
                       compute_dtype: torch.dtype = torch.float32) -> "HalfEmbedding":
        """A copy of emb's table in `dtype` (bf16/fp16). max_norm / sparse embeddings are not supported."""
        if dtype not in HALF_DTYPES:
            raise ValueError(f"dtype must be bf16 or fp16, got {dtype}")
        if getattr(emb, "max_norm", None) is not None or getattr(emb, "sparse", False):
            raise ValueError("HalfEmbedding does not support max_norm or sparse embeddings")
        return cls(emb.weight.detach().to(dtype, copy=True), compute_dtype, emb.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx).to(self.compute_dtype)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, weight_dtype={self.weight.dtype}, " \
            f"compute_dtype={self.compute_dtype}"
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
