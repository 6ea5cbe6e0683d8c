"""One Llama-family decoder layer (Llama, Mistral, Qwen2/3, SmolLM) taken apart into the stages that everything
running a layer in pieces uses: the quantizer's calibration (the input of every linear, for its Hessian), the
server's batched runner (its own RoPE, attention and KV cache) and the benchmarks.

    attn_in = input_layernorm(x)                           q, k, v input
    q, k, v = qkv(attn_in, cos, sin)                       projections, Qwen3's per-head q/k norms, RoPE
    core    = attention(q, k, v)                           o_proj input [B, T, H*D]: the caller's (cache, mask)
    mid     = x + o_proj(core)
    mlp_in  = post_attention_layernorm(mid)                gate / up input
    act     = act_fn(gate_proj(mlp_in)) * up_proj(mlp_in)  down_proj input
    out     = mid + down_proj(act)

The stages call the layer's own modules (nn.Linear, PackedLinear or anything with the same call contract) and
do what the HF layer's forward does between them, op for op, so a staged layer equals the layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# HF's RMSNorm classes of the supported families: weight * (x * rsqrt(mean(x^2) + eps)), computed in fp32.
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def is_fp32_rms_norm(norm: nn.Module) -> bool:
    """Whether `norm` is one of RMS_NORMS with an fp32 weight and an eps: what F.rms_norm and the native decode
    layer (kernels/native_decode.py) compute exactly as it does."""
    w = getattr(norm, "weight", None)
    return (type(norm).__name__ in RMS_NORMS and isinstance(w, torch.Tensor) and w.dtype == torch.float32
            and getattr(norm, "variance_epsilon", None) is not None)


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """norm(x), as one fused F.rms_norm where that is bit-identical to the HF module (fp32 input and weight: its
    sequence pow, mean, add eps, rsqrt, mul, mul gives the same bits; checked in tests/test_kernels_ops.py), else
    the module itself. Five small ops fewer per norm on every decode step."""
    if x.dtype == torch.float32 and is_fp32_rms_norm(norm):
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
    return norm(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaBlock:
    """The stages of one decoder layer. Head geometry (needed by qkv only) comes from the layer's config unless
    given."""

    def __init__(self, layer: nn.Module, num_heads: int | None = None, num_kv_heads: int | None = None,
                 head_dim: int | None = None, fuse: bool = False) -> None:
        """fuse: call q/k/v and gate/up as one packed kernel call each where the layers allow it
        (kernels.packed_linear.FusedPackedLinears; for serving: the fused weights are fixed from here on)."""
        self.layer = layer
        self.attn, self.mlp = layer.self_attn, layer.mlp
        config = getattr(self.attn, "config", None)
        self.num_heads = num_heads or getattr(config, "num_attention_heads", None)
        self.num_kv_heads = num_kv_heads or getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim or getattr(self.attn, "head_dim", None)
        self.fused_qkv = self.fused_gate_up = None
        if fuse:
            from mamp.kernels.packed_linear import FusedPackedLinears
            self.fused_qkv = FusedPackedLinears.fuse([self.attn.q_proj, self.attn.k_proj, self.attn.v_proj])
            self.fused_gate_up = FusedPackedLinears.fuse([self.mlp.gate_proj, self.mlp.up_proj])

    def attn_in(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(self.layer.input_layernorm, x)

    def qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h [B, T, hidden] (attn_in's output) -> q [B, H, T, D], k and v [B, KVH, T, D], RoPE applied with
        cos, sin broadcastable to [B, 1, T, D]."""
        b, t, _ = h.shape
        attn = self.attn
        if self.fused_qkv is not None:
            q, k, v = self.fused_qkv(h)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def mid(self, x: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        return x + self.attn.o_proj(core)

    def mlp_in(self, mid: torch.Tensor) -> torch.Tensor:
        return rms_norm(self.layer.post_attention_layernorm, mid)

    def mlp_act(self, mlp_in: torch.Tensor) -> torch.Tensor:
        """The down_proj input: act_fn(gate_proj(h)) * up_proj(h), as the HF gated MLP computes it."""
        if self.fused_gate_up is not None:
            gate, up = self.fused_gate_up(mlp_in)
            return self.mlp.act_fn(gate) * up
        return self.mlp.act_fn(self.mlp.gate_proj(mlp_in)) * self.mlp.up_proj(mlp_in)

    def out(self, mid: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return mid + self.mlp.down_proj(act)
