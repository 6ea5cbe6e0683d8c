"""Load a checkpoint for serving: a packed mamp checkpoint or a plain Hugging Face Llama-family folder."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from mamp.kernels.checkpoint import CheckpointError, load_checkpoint, load_plain_hf, read_quantization_config
from mamp.kernels.packed_linear import weight_memory

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelInfo:
    path: str
    quantized: bool              # True for a packed mamp checkpoint
    device: str
    dtype: str
    weight_bytes: int            # weights as loaded (packed), bytes
    weight_bf16_bytes: int       # the same weights stored as bf16, bytes
    max_position_embeddings: int
    kernels: tuple[tuple[str, int], ...] = ()  # (kernel name, packed layers it serves), chosen at load

    @property
    def saving_ratio(self) -> float:
        """1 - packed / bf16, in [0, 1]."""
        if self.weight_bf16_bytes <= 0:
            return 0.0
        return min(1.0, max(0.0, 1.0 - self.weight_bytes / self.weight_bf16_bytes))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def kernel_summary(model) -> tuple[tuple[str, int], ...]:
    """How many linear layers each kernel serves: for a packed checkpoint the choice each PackedLinear made at
    load; for an unquantized one, torch's own matmul ("torch")."""
    from torch import nn

    from mamp.kernels.packed_linear import PackedLinear

    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, PackedLinear):
            counts[m.kernel_name] = counts.get(m.kernel_name, 0) + 1
    if not counts:
        counts["torch"] = sum(isinstance(m, nn.Linear) for m in model.modules())
    return tuple(sorted(counts.items()))


def load_for_serving(path: str | Path, device: str = "auto", dtype: str = "auto", verify: bool = True):
    """Returns (model, tokenizer, ModelInfo); the model is in eval mode on `device`. A checkpoint that cannot be
    served as it is (damaged, tampered, missing weights or tokenizer) raises CheckpointError (one line)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a model folder (no config.json)")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    quantized = read_quantization_config(path) is not None  # quantization_config.quant_method == "mamp"
    if quantized:
        model, tokenizer = load_checkpoint(path, device=dev, dtype=dt, verify=verify)
        if tokenizer is None:
            raise CheckpointError(f"{path} has no tokenizer files; the server needs one")
    else:
        model, tokenizer = load_plain_hf(path, dev, dt)
    model.eval()
    stored, bf16 = weight_memory(model)
    info = ModelInfo(
        path=str(path),
        quantized=quantized,
        device=str(dev),
        dtype=str(dt).removeprefix("torch."),
        weight_bytes=int(stored),
        weight_bf16_bytes=int(bf16),
        max_position_embeddings=int(getattr(model.config, "max_position_embeddings", 2048)),
        kernels=kernel_summary(model),
    )
    for name, count in info.kernels:
        logger.info("%d packed layers served by the %s kernel", count, name)
    return model, tokenizer, info
