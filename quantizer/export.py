"""The quantizer's side of the checkpoint: a QuantizedModel's tensors and QuantizationConfig, written through
kernels/checkpoint.py (the module that owns the format)."""
from __future__ import annotations

from pathlib import Path

import torch

from mamp.kernels.checkpoint import CALIBRATION_KEYS, QuantizationConfig, packed_tensor_names, save_checkpoint
from mamp.quantizer.pipeline import HEAD_NAME


def quantization_config(qm) -> QuantizationConfig:
    """The QuantizationConfig of a pipeline.QuantizedModel: its spec, the measured salient fraction and exact
    bits per weight, every layer's PackSpec, and the calibration settings it was made with."""
    spec = qm.spec
    stored = sum(p.spec.stored_bits() for p in qm.packed.values())
    weights = sum(p.spec.in_features * p.spec.out_features for p in qm.packed.values())
    sal = sum(s.salient_groups for s in qm.stats)
    groups = sum(s.groups for s in qm.stats)
    bits, salient_bits, budget = spec.bits, spec.salient_bits, {}
    if spec.budget is not None:  # the smallest width the decoder uses, with its own salient width (h = b)
        bits = min(s.bits for s in qm.stats if s.name != HEAD_NAME)
        salient_bits = spec.at_bits(bits).salient_bits
        budget = dict(budget=spec.budget, budget_scope=spec.budget_scope, allocation=spec.allocation)
    return QuantizationConfig(
        method=spec.method, bits=bits, salient_bits=salient_bits, group_size=spec.group_size,
        salient_group_size=spec.salient_group_size, salient_fraction=spec.salient_fraction, top_k=spec.top_k,
        assign=spec.assign, refit=spec.refit, keep_dtype=spec.keep_dtype,
        salient_group_fraction=sal / groups if groups else 0.0,
        bits_per_weight=stored / weights if weights else 0.0,
        layers={name: p.spec for name, p in qm.packed.items()},
        calibration={k: getattr(spec, k) for k in CALIBRATION_KEYS}, **budget,
    )


def state_tensors(qm) -> dict[str, torch.Tensor]:
    """Packed tensors of the quantized linears plus every other tensor of the model (tied ones once)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, p in qm.packed.items():
        for key, v in zip(packed_tensor_names(name), p.tensors().values()):
            tensors[key] = v.detach().cpu().contiguous()
        if qm.biases.get(name) is not None:
            tensors[f"{name}.bias"] = qm.biases[name].detach().cpu().contiguous()
    skip = {f"{name}.{t}" for name in qm.packed for t in ("weight", "bias")}
    # A packed lm_head tied to the embedding: the packed copy serves both (kernels/checkpoint.py re-creates the
    # lookup), so the table is not stored again.
    packed_ptrs = {qm.model.get_submodule(name).weight.data_ptr() for name in qm.packed}
    keep = getattr(torch, qm.spec.keep_dtype)  # untouched tensors: 16-bit unless asked otherwise
    seen = set()
    for key, v in qm.model.state_dict(keep_vars=False).items():
        if key in skip or v.data_ptr() in packed_ptrs:
            continue
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ptr in seen:  # tied (lm_head = embed_tokens): stored once, re-tied from the config on load
            continue
        seen.add(ptr)
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.to(keep)
        tensors[key] = v.contiguous().clone()
    return tensors


def save_quantized(qm, tokenizer, out: str | Path, overwrite: bool = False, report: dict | None = None) -> Path:
    """Write a QuantizedModel (and its tokenizer, or None) as a checkpoint folder, atomically."""
    return save_checkpoint(out, state_tensors(qm), quantization_config(qm), qm.model.config.to_dict(),
                           generation_config=getattr(qm.model, "generation_config", None), tokenizer=tokenizer,
                           report=report, overwrite=overwrite)
