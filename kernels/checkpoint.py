"""The mamp checkpoint folder: the ONLY module that writes or reads one (the words inside a packed tensor are
kernels/packing.py's). The quantizer writes through `save_checkpoint`; the evaluator, the server and any other
engine read through `read_quantization_config` and `load_checkpoint`.

Folder layout (format version FORMAT_VERSION):

    config.json          the HF model config plus `quantization_config` (QuantizationConfig.to_dict())
    model.safetensors    every quantized linear as `<module>.qweight|bitmap|scales|zeros|hscales|hzeros[|bias]`
                         (shapes and dtypes: PackSpec.shapes()), every other tensor under its HF name (tied
                         tensors once)
    generation_config.json, tokenizer files (with the chat template), quantization_report.json (optional)
    manifest.json        format version, and size and sha256 of every other file

A folder is written to `DIR.tmp-XXXX` and renamed at the end, so an interrupted write never leaves a folder that
looks complete.
"""
from __future__ import annotations

import glob
import hashlib
import json
import secrets
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch
from torch import nn

from mamp.kernels.half_linear import HALF_DTYPES, HalfEmbedding, HalfLinear
from mamp.kernels.packed_linear import PackedEmbedding, PackedLinear
from mamp.kernels.packing import BITS, SALIENT_BITS, TENSOR_NAMES, PackSpec

QUANT_METHOD = "mamp"  # quantization_config.quant_method: how HF-style loaders recognise the format
FORMAT_VERSION = 1  # bump when a reader of the previous version would misread a new checkpoint
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "quantization_report.json"

# Allowed values, declared once (quantizer.config and the CLIs take them from here).
METHODS = ("mamp", "gptq", "rtn")
ASSIGNS = ("saliency", "error")  # how groups are given to the salient grid: see quantizer/solver.py
KEEP_DTYPES = ("bfloat16", "float16", "float32")  # storage of the tensors left unquantized
# How the checkpoint was made (not needed to read it): kept in quantization_config.calibration.
CALIBRATION_KEYS = ("calib", "nsamples", "seqlen", "seed", "percdamp", "block_size", "mse_clip", "true_sequential",
                    "sink_weight")


class CheckpointError(ValueError):
    """A folder that is not a loadable mamp checkpoint, or an output folder we may not write."""


@dataclass(frozen=True)
class QuantizationConfig:
    """config.json's `quantization_config`: what a reader needs (per-layer PackSpecs, the format version) and
    what the checkpoint is (method, widths, fractions, exact bits per weight), each stored once."""

    method: str
    bits: int
    salient_bits: int
    group_size: int
    salient_group_size: int
    salient_fraction: float  # requested (the start mask's fraction with assign="error")
    top_k: int | None
    assign: str
    refit: bool
    keep_dtype: str
    salient_group_fraction: float  # measured over all quantized layers
    bits_per_weight: float  # words + bitmap + both grids' scales and zeros, per weight of the quantized layers
    layers: Mapping[str, PackSpec] = field(default_factory=dict)  # full module name -> PackSpec
    calibration: Mapping[str, Any] = field(default_factory=dict)  # CALIBRATION_KEYS
    # Made under a bit budget (quantizer/allocation.py): the budget in bits per weight, what it counted
    # ("linears" or "model") and how the widths were chosen ("measured" or "rule"); `bits` is then the smallest
    # width of the decoder's layers and each layer's own width is in `layers`. None for a uniform checkpoint.
    budget: float | None = None
    budget_scope: str | None = None
    allocation: str | None = None
    quant_method: str = QUANT_METHOD
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.quant_method != QUANT_METHOD:
            raise CheckpointError(f"quant_method is {self.quant_method!r}, not {QUANT_METHOD!r}")
        if self.format_version != FORMAT_VERSION:
            raise CheckpointError(f"format version {self.format_version} is not {FORMAT_VERSION} (this mamp reads "
                                  f"version {FORMAT_VERSION} only)")
        if self.method not in METHODS or self.bits not in BITS or self.salient_bits not in SALIENT_BITS:
            raise CheckpointError(f"unknown method/widths: {self.method!r}, b = {self.bits}, h = {self.salient_bits}")
        if self.keep_dtype not in KEEP_DTYPES:
            raise CheckpointError(f"keep_dtype {self.keep_dtype!r} is not one of {KEEP_DTYPES}")
        # Truly read-only, also inside: the mappings are copied behind read-only views.
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        object.__setattr__(self, "calibration", MappingProxyType(dict(self.calibration)))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["layers"] = {name: spec.to_dict() for name, spec in self.layers.items()}
        d["calibration"] = dict(self.calibration)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantizationConfig":
        """Read a `quantization_config`, also as written before this class existed (format version 1 with the
        quantizer's settings repeated under "spec": its calibration settings are taken from there)."""
        if not isinstance(d, Mapping) or d.get("quant_method") != QUANT_METHOD:
            raise CheckpointError(f"no quantization_config with quant_method {QUANT_METHOD!r}")
        try:
            calibration = d.get("calibration")
            if calibration is None:
                legacy = d.get("spec") or {}
                calibration = {k: legacy[k] for k in CALIBRATION_KEYS if k in legacy}
            names = {f.name for f in fields(cls)} - {"layers", "calibration"}
            kw = {k: d[k] for k in names if k in d}
            kw["format_version"] = int(kw.get("format_version", -1))
            layers = {name: PackSpec.from_dict(s) for name, s in d["layers"].items()}
            return cls(layers=layers, calibration=calibration, **kw)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"malformed quantization_config: {e}") from None


def _mamp_entry(config: Mapping[str, Any]) -> dict | None:
    """config.json's quantization_config when it is mamp's, else None."""
    q = config.get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD else None


def read_quantization_config(path: str | Path) -> QuantizationConfig | None:
    """The QuantizationConfig of a folder, None for an ordinary (unquantized) HF folder. A mamp folder this
    version cannot read raises CheckpointError."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        config = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg}: unreadable ({e})") from None
    q = _mamp_entry(config) if isinstance(config, dict) else None
    return None if q is None else QuantizationConfig.from_dict(q)


# Writing -------------------------------------------------------------------------------------------------------

def check_output(out: str | Path, overwrite: bool) -> None:
    if Path(out).exists() and not overwrite:
        raise CheckpointError(f"output folder {out} exists (pass --overwrite to replace it)")


def remove_stale_temporaries(out: str | Path) -> list[Path]:
    """Remove the `OUT.tmp-XXXX` folders a killed writer left beside `out` (save_checkpoint writes there first);
    returns them. `OUT.old-XXXX` (the previous checkpoint, kept while being replaced) is left alone."""
    out = Path(out)
    stale = sorted(p for p in out.parent.glob(f"{glob.escape(out.name)}.tmp-*") if p.is_dir())
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def packed_tensor_names(module: str) -> list[str]:
    """The safetensors keys of one packed linear (bias excluded)."""
    return [f"{module}.{t}" for t in TENSOR_NAMES]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(out: str | Path, tensors: Mapping[str, torch.Tensor], config: QuantizationConfig,
                    model_config: Mapping[str, Any], *, generation_config=None, tokenizer=None,
                    report: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write the checkpoint folder `out` atomically.

    tensors: every tensor of the file, packed ones under packed_tensor_names (contiguous, on the CPU);
    model_config: the HF config as a dict (quantization_config is added here); generation_config and tokenizer:
    HF objects with save_pretrained, or None; report: JSON for quantization_report.json, or None.
    """
    from safetensors.torch import save_file

    out = Path(out)
    check_output(out, overwrite)
    missing = [k for name in config.layers for k in packed_tensor_names(name) if k not in tensors]
    if missing:
        raise CheckpointError(f"packed tensors missing from the state: {missing[:5]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        save_file(dict(tensors), str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "quant_method": QUANT_METHOD})
        (tmp / WEIGHTS_NAME).chmod(0o644)  # safetensors creates it 0600; a server may run as another user
        cfg = dict(model_config)
        cfg["quantization_config"] = config.to_dict()
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
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


# Reading -------------------------------------------------------------------------------------------------------

def verify_files(path: str | Path) -> None:
    """Check every file the manifest lists against its size and sha256, and the manifest's format version.
    CheckpointError naming the file on the first mismatch, on a missing file, or on a missing or unreadable
    manifest (a checkpoint without one cannot be verified: load it with verify=False if it is trusted)."""
    path = Path(path)
    mpath = path / MANIFEST_NAME
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        version = int(manifest.get("format_version", -1))
    except FileNotFoundError:
        raise CheckpointError(f"{mpath}: missing, so the checkpoint cannot be verified (--no-verify skips the check)"
                              ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: unreadable ({e})") from None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: format version {version} is not {FORMAT_VERSION}")
    if not isinstance(files, dict) or WEIGHTS_NAME not in files or "config.json" not in files:
        raise CheckpointError(f"{mpath}: does not list {WEIGHTS_NAME} and config.json")
    for name, meta in files.items():
        f = path / name
        if not isinstance(meta, dict):
            raise CheckpointError(f"{mpath}: the entry for {name!r} is not an object with size and sha256")
        if Path(name).name != name:
            raise CheckpointError(f"{mpath}: lists {name!r}, not a file of the folder")
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the manifest but missing")
        size = f.stat().st_size
        if size != meta.get("size"):
            raise CheckpointError(f"{f}: {size} bytes, the manifest says {meta.get('size')} (truncated or replaced)")
        if _sha256(f) != meta.get("sha256"):
            raise CheckpointError(f"{f}: sha256 differs from the manifest (the file was modified or corrupted)")


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0][:200]})") from None


def load_plain_hf(path: str | Path, device="cpu", dtype=torch.float32):
    """Load an ordinary (unquantized) HF causal-LM folder -> (model, tokenizer), refusing what would otherwise
    be served with randomly initialised layers: packed mamp tensors without a quantization_config, or weights
    the architecture needs but the files lack."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a model folder (no config.json)")
    weights = path / WEIGHTS_NAME
    if weights.is_file():
        packed = [k for k in _safetensors_keys(weights) if k.endswith(".qweight")]
        if packed:
            raise CheckpointError(f"{path}: {WEIGHTS_NAME} holds packed mamp tensors ({packed[0]}, ...) but "
                                  "config.json has no quantization_config: the checkpoint is damaged")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot load ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                              ) from None
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith("rotary_emb.inv_freq")]
    if missing:
        raise CheckpointError(f"{path}: weights missing from the checkpoint: {', '.join(sorted(missing)[:3])}"
                              f"{' ...' if len(missing) > 3 else ''}")
    return model.to(device).eval(), tokenizer


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
    elif head is not None and not isinstance(head, PackedLinear) and head.weight.dtype in HALF_DTYPES:
        model.set_output_embeddings(HalfLinear(head.weight, head.bias))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def load_checkpoint(path: str | Path, device="cpu", dtype=torch.float32, verify: bool = True):
    """Load a mamp checkpoint folder -> (model, tokenizer or None).

    The model is the HF architecture from config.json, built without allocating its float weights, with every
    quantized nn.Linear replaced by kernels.packed_linear.PackedLinear holding the packed buffers (each layer's
    `process_after_loading` aligns them and picks its kernel). Unquantized tensors are cast to `dtype`, except
    that a 16-bit embedding table (and its lm_head, tied or not) loaded for fp32 compute stays 16-bit in
    kernels.half_linear's HalfEmbedding/HalfLinear, so memory matches the file; packed tensors keep their stored
    dtypes. The model is in eval mode on `device`.

    verify: check every file against the manifest first (verify_files). Always: every packed tensor present with
    the shape and dtype its PackSpec gives, no unexpected tensor, none missing. Any failure: CheckpointError
    with one line naming the file or tensor.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: unreadable ({e})") from None
    entry = _mamp_entry(cfg) if isinstance(cfg, dict) else None
    if entry is None:
        raise CheckpointError(f"{path} is not a mamp checkpoint (no quantization_config with quant_method "
                              f"{QUANT_METHOD!r})")
    if verify:  # before anything of the folder is trusted further
        verify_files(path)
    q = QuantizationConfig.from_dict(entry)
    cfg.pop("quantization_config")
    try:
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (KeyError, ValueError, TypeError) as e:  # no or unknown model_type, bad fields
        raise CheckpointError(f"{path / 'config.json'}: not a model config transformers can build ({e})") from None

    try:
        with safe_open(str(path / WEIGHTS_NAME), framework="pt", device=str(device)) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{path / WEIGHTS_NAME}: unreadable ({str(e).splitlines()[0][:200]})") from None
    packed_keys = set()
    for name, spec in q.layers.items():
        for key, (shape, dt) in zip(packed_tensor_names(name), spec.shapes().values()):
            t = state.get(key)
            if t is None:
                raise CheckpointError(f"{path / WEIGHTS_NAME}: packed tensor {key} is missing")
            if tuple(t.shape) != shape or t.dtype != dt:
                raise CheckpointError(f"{path / WEIGHTS_NAME}: {key} is {t.dtype} {tuple(t.shape)}, the config "
                                      f"says {dt} {shape}")
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: quantization_config names layer {name}, which the model lacks") from None
        shape = (getattr(target, "in_features", None), getattr(target, "out_features", None))
        if shape != (spec.in_features, spec.out_features):
            raise CheckpointError(f"{path}: layer {name} is {shape[1]}x{shape[0]} in the model, "
                                  f"{spec.out_features}x{spec.in_features} in quantization_config")
        _set_module(model, name, PackedLinear(spec, bias=f"{name}.bias" in state, dtype=dtype, device="meta"))
        packed_keys.update(packed_tensor_names(name))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head = model.get_output_embeddings()
    packed_head = tied and isinstance(head, PackedLinear)
    if packed_head:  # the file holds one packed copy for lm_head and embedding: look rows up from it
        emb = model.get_input_embeddings()
        model.set_input_embeddings(PackedEmbedding(head, dtype, getattr(emb, "padding_idx", None)))
    keep16 = _sixteen_bit_tables(model, state, dtype)
    for k, v in state.items():
        if k not in packed_keys and k not in keep16 and v.is_floating_point():
            state[k] = v.to(dtype)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # a tensor whose shape disagrees with config.json
        raise CheckpointError(f"{path / WEIGHTS_NAME}: {' '.join(str(e).split())[:300]}") from None
    state.clear()  # the model holds the tensors now: no second reference while layers re-lay them out below
    if result.unexpected_keys:
        raise CheckpointError(f"{path}: unexpected tensors {result.unexpected_keys[:5]}")
    if tied and not packed_head:
        model.tie_weights()
    if keep16:
        _wrap_sixteen_bit_tables(model, dtype, tied=tied)
    # Non-persistent buffers (rotary inv_freq) are not in the file: rebuild those modules on the real device.
    for name, m in list(model.named_modules()):
        if any(b.is_meta for b in m.buffers(recurse=False)) and not isinstance(m, PackedLinear):
            with torch.device(device):
                _set_module(model, name, type(m)(config=model.config))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: tensors missing from {WEIGHTS_NAME}: {left[:5]}")
    model.to(device).eval()  # PackedLinear._apply: align buffers, choose each layer's kernel
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: the tokenizer files cannot be loaded ({str(e).splitlines()[0][:200]})"
                                  ) from None
    return model, tokenizer
