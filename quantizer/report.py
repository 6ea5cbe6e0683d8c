"""Summary of a quantization run: exact bits per weight, bytes vs bf16, time, peak memory, salient fractions."""
from __future__ import annotations

import resource
import sys
from collections import defaultdict

import torch
from torch import nn


def peak_memory_bytes() -> int:
    """Peak resident set size of this process (getrusage maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def summarize(qm, seconds: float | None = None) -> dict:
    """Numbers of a pipeline.QuantizedModel. Bits count everything the packed format stores for the quantized
    linears (words, bitmap, both grids' scales and zeros; biases excluded); the whole-model figures add every
    other tensor in the dtype the checkpoint stores it in (spec.keep_dtype), tied tensors once."""
    packed_bits = sum(p.spec.stored_bits() for p in qm.packed.values())
    qweights = sum(p.spec.in_features * p.spec.out_features for p in qm.packed.values())
    decoder = [p.spec for n, p in qm.packed.items() if n != "lm_head"]
    decoder_weights = sum(p.in_features * p.out_features for p in decoder)
    bias = sum(b.numel() for b in qm.biases.values() if b is not None)
    quantized_names = set(qm.packed)
    other, seen = 0, set()
    for name in quantized_names:  # a tied embedding shares a packed lm_head's weight: counted with it
        w = qm.model.get_submodule(name).weight
        seen.add((w.untyped_storage().data_ptr(), w.numel()))
    for name, mod in qm.model.named_modules():
        if name in quantized_names:
            continue
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            key = (t.untyped_storage().data_ptr(), t.numel())
            if key in seen or not t.is_floating_point() or not isinstance(mod, nn.Module):
                continue
            seen.add(key)
            other += t.numel()
    # Non-persistent buffers (rotary inv_freq) are not weights.
    other -= sum(b.numel() for n, b in qm.model.named_buffers() if n.endswith("inv_freq"))
    sal_by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for s in qm.stats:
        kind = s.name.split(".")[-1]
        sal_by_type[kind][0] += s.salient_groups
        sal_by_type[kind][1] += s.groups
    keep = torch.empty(0, dtype=getattr(torch, qm.spec.keep_dtype)).element_size()
    q_bytes = packed_bits / 8 + 2 * bias
    bf16_q = 2 * (qweights + bias)
    return {
        "method": qm.spec.method,
        "bits": qm.spec.bits,
        "salient_bits": qm.spec.salient_bits,
        "salient_fraction": qm.spec.salient_fraction,
        "top_k": qm.spec.top_k,
        "group_size": qm.spec.group_size,
        "salient_group_size": qm.spec.salient_group_size,
        "mse_clip": qm.spec.mse_clip,
        "assign": qm.spec.assign,
        "refit": qm.spec.refit,
        "keep_dtype": qm.spec.keep_dtype,
        "quantized_layers": len(qm.packed),
        "quantized_weights": qweights,
        "bits_per_weight": packed_bits / qweights if qweights else 0.0,
        "decoder_bits_per_weight": sum(p.stored_bits() for p in decoder) / decoder_weights if decoder else 0.0,
        "budget": qm.spec.budget,
        "budget_scope": qm.spec.budget_scope,
        "allocation": qm.spec.allocation,
        "quantized_bytes": int(q_bytes),
        "quantized_bytes_bf16": bf16_q,
        "model_bytes": int(q_bytes + keep * other),
        "model_bytes_bf16": bf16_q + 2 * other,
        "model_weights": qweights + bias + other,
        "salient_group_fraction_by_type": {k: v[0] / v[1] if v[1] else 0.0 for k, v in sorted(sal_by_type.items())},
        "seconds": qm.seconds if seconds is None else seconds,
        "peak_memory_bytes": peak_memory_bytes(),
    }


def fixed_bits(model: nn.Module, spec, linear_names: set[str]) -> tuple[int, int]:
    """(bits, weights) of everything a checkpoint of `model` stores besides the decoder's packed linear weights:
    the lm_head packed at spec.head_bits (or kept in spec.keep_dtype, as the embeddings, norms and biases are),
    tied tensors once. What a whole-model budget (--budget-scope model) must leave room for."""
    from mamp.kernels.packing import PackSpec

    keep = torch.empty(0, dtype=getattr(torch, spec.keep_dtype)).element_size() * 8
    head = model.get_output_embeddings()
    head_ptr = head.weight.untyped_storage().data_ptr() if head is not None else None
    skip = {f"{n}.weight" for n in linear_names}
    bits = weights = 0
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name in skip or not t.is_floating_point() or name.endswith("inv_freq"):
            continue
        key = (t.untyped_storage().data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        weights += t.numel()
        if spec.head_bits and t.untyped_storage().data_ptr() == head_ptr and t.dim() == 2:
            n, k = t.shape
            bits += PackSpec(k, n, bits=spec.head_bits, salient_bits=spec.head_bits, group_size=spec.group_size,
                             salient_group_size=spec.salient_group_size).stored_bits()
        else:
            bits += keep * t.numel()
    return bits, weights


def format_summary(s: dict) -> str:
    mb = 1 << 20
    lines = []
    if s.get("budget") is not None:
        lines += [f"budget {s['budget']:g} bits per weight over the {s['budget_scope']} ({s['allocation']} allocation); "
                  "widths per decoder layer:", s["widths"]]
        if s.get("predicted_kl") is not None:
            lines.append(f"KL from the float model on {s['kl_tokens']} calibration tokens: predicted "
                         f"{s['predicted_kl']:.4f} (sum over units), measured {s['measured_kl']:.4f} nats per token")
        elif s.get("measured_kl") is not None:
            lines.append(f"KL from the float model on {s['kl_tokens']} calibration tokens: measured "
                         f"{s['measured_kl']:.4f} nats per token")
    # Under a budget the widths above say what each unit got (each width with its own salient defaults); the
    # spec's base width is only the smallest of them, so it is not printed as if it were the model's.
    widths = ("widths per unit above" if s.get("budget") is not None else
              f"bits {s['bits']}  salient bits {s['salient_bits']}  salient fraction {s['salient_fraction']}")
    lines += [
        f"method {s['method']}  {widths} ({s['assign']})  refit {s['refit']}  "
        f"group {s['group_size']}/{s['salient_group_size']}  mse clip {s['mse_clip']}",
        f"bits per weight (words + bitmap + scales + zeros, both grids): {s['decoder_bits_per_weight']:.4f} over the "
        f"decoder's linear layers, {s['bits_per_weight']:.4f} over all packed layers",
        f"quantized layers: {s['quantized_layers']} linears, {s['quantized_bytes'] / mb:.2f} MiB vs "
        f"{s['quantized_bytes_bf16'] / mb:.2f} MiB bf16 ({100 * s['quantized_bytes'] / s['quantized_bytes_bf16']:.1f}%)",
        f"whole model (other tensors in {s['keep_dtype']}): {s['model_bytes'] / mb:.2f} MiB vs {s['model_bytes_bf16'] / mb:.2f} MiB "
        f"bf16 ({100 * s['model_bytes'] / s['model_bytes_bf16']:.1f}%), "
        f"{8 * s['model_bytes'] / s['model_weights']:.4f} bits per weight",
        "salient groups by layer type: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in
                                                      s["salient_group_fraction_by_type"].items()),
        f"time {s['seconds']:.1f} s, peak memory {s['peak_memory_bytes'] / (1 << 30):.2f} GiB",
    ]
    return "\n".join(lines)
