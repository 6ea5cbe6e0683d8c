"""The decode step of a decoder layer in native code (kernels/cpu_decode_layer.cpp, torch.classes.mamp.DecodeLayer)
where a layer allows it, else None and the reason (the caller runs the Python stages of kernels/llama_block.py).

It applies to a Llama-family layer on the CPU in fp32 whose four projections are packed and served by the C++
kernels (q/k/v and gate/up fused by LlamaBlock(fuse=True), no biases), with RMSNorm, SiLU and no per-head q/k
norms. MAMP_NATIVE_DECODE=0 turns it off (the Python stages then serve, as before).

    layer = native_decode_layer(block)          # DecodeLayer or None
    h = layer.forward(h, cache.layer_tensors(i), cache.tables, rows, positions, cos, sin)  # server/kv_cache.py
    stack = native_decode_stack(blocks)         # DecodeStack: all layers in one call (the runner's choice)
    h = stack.forward(h, [t for i in range(n) for t in cache.layer_tensors(i)], cache.tables, rows, positions, cos, sin)
"""
from __future__ import annotations

import os

import torch
from torch import nn

from mamp.kernels import cpu_matmul, ops
from mamp.kernels.llama_block import LlamaBlock, is_fp32_rms_norm
from mamp.kernels.packed_linear import PackedLinear

ENV = "MAMP_NATIVE_DECODE"
_KERNELS = {"cpu-int8": 1, "cpu": 0}  # the C++ kernels a native layer calls: int8 activations or fp32


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip() != "0"


def _linear_args(view) -> tuple[list[torch.Tensor], list[int]]:
    s = view.spec
    return ([view.qweight, view.bitmap, view.scales, view.zeros, view.hscales, view.hzeros],
            [s.bits, s.salient_bits, s.group_size, s.salient_group_size])


def why_not(block: LlamaBlock) -> str | None:
    """None where native_decode_layer applies to the block, else the first reason it does not."""
    if not enabled():
        return f"{ENV}=0"
    layer, attn, mlp = block.layer, block.attn, block.mlp
    if block.fused_qkv is None or block.fused_gate_up is None:
        return "q/k/v or gate/up are not fused packed layers"
    kernels = {block.fused_qkv.kernel.name, block.fused_gate_up.kernel.name}
    for m in (attn.o_proj, mlp.down_proj):
        if not (isinstance(m, PackedLinear) and m.tiled and m.bias is None):
            return "o_proj / down_proj are not column-tiled packed layers without bias"
        kernels.add(m.kernel_name)
    if len(kernels) != 1 or next(iter(kernels)) not in _KERNELS:
        return f"the projections use kernels {sorted(kernels)}, not one of {sorted(_KERNELS)}"
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        if not is_fp32_rms_norm(norm):
            return f"{type(norm).__name__} is not an fp32 RMSNorm"
    if layer.input_layernorm.variance_epsilon != layer.post_attention_layernorm.variance_epsilon:
        return "the two norms have different eps"
    if hasattr(attn, "q_norm"):
        return "per-head q/k norms (Qwen3) are not in the native step"
    act = type(getattr(mlp, "act_fn", None))
    if not (issubclass(act, nn.SiLU) or (act.__module__, act.__name__) == ("transformers.activations", "SiLUActivation")):
        return f"activation {act.__name__} is not SiLU"
    if not ops.load_cpu_ops():
        return "the C++ extension is unavailable"
    return None


def native_decode_layer(block: LlamaBlock):
    """torch.classes.mamp.DecodeLayer over the block's packed tensors (shared, not copied), or None (why_not)."""
    if why_not(block) is not None:
        return None
    return torch.classes.mamp.DecodeLayer(*_layer_args(block))


def native_decode_stack(blocks: list[LlamaBlock]):
    """torch.classes.mamp.DecodeStack: every block's decode step in one call (their DecodeLayer arguments
    concatenated), or None where any block does not allow it."""
    if not blocks or any(why_not(b) is not None for b in blocks):
        return None
    args = [_layer_args(b) for b in blocks]
    return torch.classes.mamp.DecodeStack([t for a in args for t in a[0]], [i for a in args for i in a[1]],
                                          [a[2] for a in args])


def _layer_args(block: LlamaBlock) -> tuple[list[torch.Tensor], list[int], float]:
    kernel = block.fused_qkv.kernel.name
    views = [block.fused_qkv.view, block.attn.o_proj.__dict__["_view"], block.fused_gate_up.view,
             block.mlp.down_proj.__dict__["_view"]]
    tensors, ints = [], []
    for v in views:
        t, i = _linear_args(v)
        tensors += t
        ints += i
    layer = block.layer
    tensors += [layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()]
    int8 = _KERNELS[kernel]
    ints += [block.num_heads, block.num_kv_heads, block.head_dim, block.mlp.down_proj.in_features, int8,
             cpu_matmul.ACT_BLOCK, cpu_matmul.INT8_MAX_M if int8 else cpu_matmul.SMALL_M, cpu_matmul.SCRATCH_BYTES]
    return tensors, ints, float(layer.input_layernorm.variance_epsilon)
