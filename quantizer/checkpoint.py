"""Save a quantized model as a checkpoint folder, and load it back with PackedLinear layers.

Folder layout: config.json (the HF config plus `quantization_config`), model.safetensors (packed tensors of every
quantized linear under `<module>.qweight|bitmap|scales|zeros|hscales|hzeros[|bias]`, and every other tensor
unchanged), generation_config.json, the tokenizer files with the chat template, and manifest.json (size and
sha256 of every other file). It is written to `DIR.tmp-XXXX` and renamed at the end, so an interrupted run never
leaves a folder that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from kernels.half_linear import HALF_DTYPES, HalfEmbedding, HalfLinear
from kernels.packed_linear import PackedLinear
from kernels.packing import FORMAT_VERSION, TENSOR_NAMES, PackSpec

QUANT_METHOD = "mamp"
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.json"


class CheckpointError(ValueError):
    """A folder that is not a loadable mamp checkpoint, or an output folder we may not write."""


def quantization_config(qm) -> dict:
    """The `quantization_config` entry of config.json for a pipeline.QuantizedModel."""
    spec = qm.spec
    layers = {name: p.spec.to_dict() for name, p in qm.packed.items()}
    stored = sum(p.spec.stored_bits() for p in qm.packed.values())
    weights = sum(p.spec.in_features * p.spec.out_features for p in qm.packed.values())
    sal = sum(s.salient_groups for s in qm.stats)
    groups = sum(s.groups for s in qm.stats)
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "method": spec.method,
        "bits": spec.bits,
        "salient_bits": spec.salient_bits,
        "group_size": spec.group_size,
        "salient_group_size": spec.salient_group_size,
        "salient_fraction": spec.salient_fraction,
        "top_k": spec.top_k,
        "assign": spec.assign,
        "refit": spec.refit,
        "keep_dtype": spec.keep_dtype,
        "salient_group_fraction": sal / groups if groups else 0.0,
        "bits_per_weight": stored / weights if weights else 0.0,
        "spec": spec.to_dict(),
        "layers": layers,
    }


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise CheckpointError(f"output folder {out} exists (pass --overwrite to replace it)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _state_tensors(qm) -> dict[str, torch.Tensor]:
    """Packed tensors of the quantized linears plus every other tensor of the model (tied ones once)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, p in qm.packed.items():
        for t, v in p.tensors().items():
            tensors[f"{name}.{t}"] = v.detach().cpu().contiguous()
        if qm.biases.get(name) is not None:
            tensors[f"{name}.bias"] = qm.biases[name].detach().cpu().contiguous()
    skip = {f"{name}.{t}" for name in qm.packed for t in ("weight", "bias")}
    keep = getattr(torch, qm.spec.keep_dtype)  # untouched tensors: 16-bit unless asked otherwise
    seen = set()
    for key, v in qm.model.state_dict(keep_vars=False).items():
        if key in skip:
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


def save_checkpoint(qm, tokenizer, out: str | Path, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write the checkpoint folder `out` atomically. extra: more JSON written as quantization_report.json."""
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        save_file(_state_tensors(qm), str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "quant_method": QUANT_METHOD})
        (tmp / WEIGHTS_NAME).chmod(0o644)  # safetensors creates it 0600; a server may run as another user
        config = qm.model.config.to_dict()
        config["quantization_config"] = quantization_config(qm)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        gen = getattr(qm.model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            (tmp / "quantization_report.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST_NAME).write_text(json.dumps({"format_version": FORMAT_VERSION, "files": files}, indent=2) + "\n")
        if out.exists():
            old = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_quantization_config(path: str | Path) -> dict | None:
    """The mamp quantization_config of a folder, or None for an ordinary (unquantized) HF checkpoint."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    q = json.loads(cfg.read_text()).get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD else None


ALIGN = 64  # bytes: a cache line / AVX-512 vector


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself, or a copy starting on an ALIGN-byte boundary. Tensors read from a safetensors file start wherever
    the header left them (8-byte steps); the CPU kernels measured 1.7x slower on packed words 8 bytes off a cache
    line (SmolLM2 MLP, M = 1: 1.43 vs 0.86 ms)."""
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


def _sixteen_bit_tables(model: nn.Module, state: dict, dtype: torch.dtype) -> set[str]:
    """Keys of the embedding / lm_head weights to keep 16-bit: stored bf16/fp16 while the model computes fp32."""
    if dtype != torch.float32:
        return set()
    names = {n for n, m in model.named_modules() if m is model.get_input_embeddings() or m is model.get_output_embeddings()}
    keys = {f"{n}.weight" for n in names}
    return {k for k in keys if k in state and state[k].dtype in HALF_DTYPES}


def _wrap_sixteen_bit_tables(model: nn.Module, dtype: torch.dtype, tied: bool) -> None:
    """Embedding -> HalfEmbedding and lm_head -> HalfLinear around their 16-bit weights (one table when tied)."""
    emb = model.get_input_embeddings()
    if emb.weight.dtype in HALF_DTYPES:
        emb = HalfEmbedding(emb.weight, compute_dtype=dtype, padding_idx=emb.padding_idx)
        model.set_input_embeddings(emb)
    head = model.get_output_embeddings()
    if tied and isinstance(emb, HalfEmbedding):
        model.set_output_embeddings(HalfLinear(emb.weight, getattr(head, "bias", None)))
    elif head is not None and head.weight.dtype in HALF_DTYPES:
        model.set_output_embeddings(HalfLinear(head.weight, head.bias))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def load_checkpoint(path, device="cpu", dtype=torch.float32):
    """Load a mamp checkpoint folder -> (model, tokenizer).

    The model is the HF architecture from config.json, built without allocating its float weights, with every
    quantized nn.Linear replaced by kernels.packed_linear.PackedLinear holding the packed buffers. Unquantized
    tensors are cast to `dtype`, except that a 16-bit embedding table (and its lm_head, tied or not) loaded for
    fp32 compute stays 16-bit in kernels.half_linear's HalfEmbedding/HalfLinear, so memory matches the file;
    packed tensors keep their stored dtypes. The model is in eval mode on `device`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json")
    cfg = json.loads((path / "config.json").read_text())
    q = cfg.pop("quantization_config", None)
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path} is not a mamp checkpoint (no quantization_config with quant_method 'mamp')")
    if int(q.get("format_version", -1)) != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {q.get('format_version')} is not {FORMAT_VERSION}")
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    with safe_open(str(path / WEIGHTS_NAME), framework="pt", device=str(device)) as f:
        state = {k: _aligned(f.get_tensor(k)) for k in f.keys()}
    packed_keys = set()
    for name, d in q["layers"].items():
        spec = PackSpec.from_dict(d)
        has_bias = f"{name}.bias" in state
        _set_module(model, name, PackedLinear(spec, bias=has_bias, dtype=dtype, device="meta"))
        packed_keys.update(f"{name}.{t}" for t in TENSOR_NAMES)
    keep16 = _sixteen_bit_tables(model, state, dtype)
    for k, v in state.items():
        if k not in packed_keys and k not in keep16 and v.is_floating_point():
            state[k] = v.to(dtype)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{path}: unexpected tensors {result.unexpected_keys[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if keep16:
        _wrap_sixteen_bit_tables(model, dtype, tied=bool(getattr(config, "tie_word_embeddings", False)))
    # Non-persistent buffers (rotary inv_freq) are not in the file: rebuild those modules on the real device.
    for name, m in list(model.named_modules()):
        if any(b.is_meta for b in m.buffers(recurse=False)) and not isinstance(m, PackedLinear):
            with torch.device(device):
                _set_module(model, name, type(m)(config=model.config))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: tensors missing from {WEIGHTS_NAME}: {left[:5]}")
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model, tokenizer
