"""CPU packed matmul: a small C++ extension (kernels/cpu_matmul.cpp) with a pure-torch fallback.

The same extension also carries the 16-bit-weight matmul of kernels/cpu_half_matmul.cpp (used by
kernels/half_linear.py): both sources are compiled into one module, whose PYBIND11_MODULE lives in cpu_matmul.cpp.

Neither path keeps a dequantized copy of the weights: decode (M <= SMALL_M) streams the packed words straight
into the dot products; prefill dequantizes one block of columns at a time into a bounded scratch and calls BLAS.

The extension is compiled on first use (not at import), cached under $TORCH_EXTENSIONS_DIR or
~/.cache/mamp/torch_extensions, and uses at::parallel_for, so torch.set_num_threads applies. If it cannot be
built (no compiler, no headers), `packed_matmul_cpu` falls back to `packed_matmul_torch` and says so once.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

from mamp.kernels.packing import GROUP, PackedWeight

log = logging.getLogger(__name__)

SMALL_M = 16  # streaming kernel up to this M; above, dequantize column blocks + BLAS (measured crossover)
SCRATCH_BYTES = 4 << 20  # prefill: fp32 scratch per dequantized column block (all K rows x nb columns)
TORCH_K_TILE = 1024  # rows per tile in the torch fallback
# Inputs per int8 activation scale in the integer-dot kernel (cpu_int8_matmul.cpp), chosen by measurement
# (docs/RESULTS.md, SmolLM2 b = 4 with an 8-bit lm_head, reference protocol, vs fp32 activations): 32: +0.44 %
# perplexity, 64: +0.62 %, 128: +1.01 %; the 210 decoder linears at M = 16 took 32.2 / 27.6 / 25.6 ms (M = 1: equal).
ACT_BLOCK = 64
# Rows up to which the integer kernel serves; above, the float kernel (dequantize column blocks + BLAS). The
# integer kernel won at every M measured (docs/RESULTS.md, 2 threads: 1.5-2.1x at M = 1024 on SmolLM2 and Llama-7B
# shapes, 5-13x at M = 17-64, where the float path dequantizes the whole layer for a few rows), so it takes all.
INT8_MAX_M = 1 << 30
# Which decode kernel serves h = b layers on the CPU: "int8" (integer dot products, activations quantized per
# block) or "float" (fp32 activations). Read when a layer chooses its kernel (at load).
ACTIVATIONS_ENV = "MAMP_CPU_ACTIVATIONS"


def cpu_activations() -> str:
    v = os.environ.get(ACTIVATIONS_ENV, "int8").strip().lower()
    if v not in ("int8", "float"):
        raise ValueError(f"{ACTIVATIONS_ENV} must be int8 or float, got {v!r}")
    return v


def int8_isa() -> str | None:
    """The integer kernel's instruction set here ("avx512-vnni", "avx2", "portable"); None without the extension."""
    ext = load_extension()
    return None if ext is None else ext.int8_isa()

_SOURCE = Path(__file__).with_name("cpu_matmul.cpp")
# One module; the PYBIND11_MODULE is in _SOURCE. _HEADERS are included by them: their bytes name the build, since
# torch's JIT loader rebuilds on changed sources but not on changed headers.
_SOURCES = (_SOURCE, Path(__file__).with_name("cpu_half_matmul.cpp"), Path(__file__).with_name("cpu_int8_matmul.cpp"),
            Path(__file__).with_name("cpu_decode_layer.cpp"))
_HEADERS = (Path(__file__).with_name("cpu_layout.h"),)
_lock = threading.Lock()
_ext = None
_ext_error: str | None = None


def _arch_flags() -> tuple[str, list[str]]:
    """Instruction-set flags from torch's own CPU capability (not -march=native: the cache may be shared)."""
    cap = os.environ.get("MAMP_CPU_ISA") or torch.backends.cpu.get_cpu_capability().lower()  # "default": portable
    flags = {
        "avx2": ["-mavx2", "-mfma", "-mf16c"],
        "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
    }.get(cap, [])
    return cap, flags


def _build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "mamp" / "torch_extensions"


def load_extension():
    """The compiled module, building it on first call; None if it cannot be built (reason in `ext_error()`)."""
    global _ext, _ext_error
    if _ext is not None or _ext_error is not None:
        return _ext
    with _lock:
        if _ext is not None or _ext_error is not None:
            return _ext
        if os.environ.get("MAMP_CPU_EXTENSION", "1") == "0":
            _ext_error = "disabled by MAMP_CPU_EXTENSION=0"
            return None
        try:
            from torch.utils.cpp_extension import load

            cap, flags = _arch_flags()
            # The headers' bytes, and the torch installation: torch's loader rebuilds when the build arguments
            # change, and two environments sharing the cache (another venv's include paths) would rebuild it
            # back and forth, a minute each time.
            digest = hashlib.sha256(b"".join(p.read_bytes() for p in _HEADERS)
                                    + str(Path(torch.__file__).parent).encode()).hexdigest()[:10]
            name = f"mamp_cpu_matmul_v5_{cap}_{digest}"
            build = _build_dir() / name
            build.mkdir(parents=True, exist_ok=True)
            _ext = load(name=name, sources=[str(p) for p in _SOURCES], build_directory=str(build),
                        extra_cflags=["-O3", "-fopenmp", *flags], extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # no compiler / headers / ninja: the torch path still works
            full = f"{type(e).__name__}: {e}".strip()
            # The compiler's own error is at the end of a long build log: the short form keeps both ends.
            _ext_error = full if len(full) <= 600 else f"{full[:250]} ... {full[-350:]}"
            log.warning("mamp CPU extension unavailable, using the torch path (the full reason follows):\n%s", full)
    return _ext


def ext_error() -> str | None:
    return _ext_error


def cpu_backend() -> str:
    """'cpp' or 'torch': what packed_matmul_cpu will run (builds the extension if needed)."""
    return "cpp" if load_extension() is not None else "torch"


def _check_args(x: torch.Tensor, packed: PackedWeight, out: torch.Tensor | None) -> None:
    k, n = packed.spec.in_features, packed.spec.out_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, layer expects {k}")
    if out is not None and (out.shape != (*x.shape[:-1], n) or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"out: expected contiguous {x.dtype} {(*x.shape[:-1], n)}, got {out.dtype} {tuple(out.shape)}")


def packed_matmul_cpu(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None,
                      out: torch.Tensor | None = None, small_m: int = SMALL_M,
                      scratch_bytes: int = SCRATCH_BYTES) -> torch.Tensor:
    """y = x W^T + bias on the CPU, same contract as kernels.reference.packed_matmul_reference.

    x: [..., K] fp16/bf16/fp32, any strides; packed: W [N, K] (CPU tensors); bias: [N] or None;
    out: optional contiguous [..., N] in x.dtype, fully overwritten. Returns [..., N] in x.dtype, accumulated
    in fp32. The conversions happen in C++: one decode step is one Python -> C++ call.
    """
    ext = _ext if _ext is not None else load_extension()
    if ext is None:
        return packed_matmul_torch(x, packed, bias, out)
    _check_args(x, packed, out)
    spec = packed.spec
    n = spec.out_features
    y = ext.packed_linear(x.reshape(-1, spec.in_features), packed.qweight, packed.bitmap, packed.scales,
                          packed.zeros, packed.hscales, packed.hzeros, bias,
                          None if out is None else out.view(-1, n), spec.bits, spec.salient_bits,
                          spec.group_size, spec.salient_group_size, small_m, scratch_bytes)
    return out if out is not None else y.view(*x.shape[:-1], n)


def int8_linear(packed: PackedWeight):
    """The layer prepared once for the integer-dot kernel (Int8Linear of cpu_int8_matmul.cpp: its plan built here,
    kept with the tensors it reads), or None where the extension cannot be built. Its forward(x, bias) is
    torch.ops.mamp.packed_linear_int8_cpu without the per-call plan and the dispatcher's fixed cost (PackedLinear
    calls it outside torch.compile). packed: a PackedWeight or TiledWeight with salient_bits = bits in {2, 4, 8}."""
    ext = _ext if _ext is not None else load_extension()
    if ext is None:
        return None
    s = packed.spec
    return ext.Int8Linear([packed.qweight, packed.bitmap, packed.scales, packed.zeros, packed.hscales, packed.hzeros],
                          [s.bits, s.salient_bits, s.group_size, s.salient_group_size, ACT_BLOCK, s.in_features])


def dequantize_tile_torch(packed: PackedWeight, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of qweight (r0, r1 on group boundaries) dequantized to [(r1 - r0) * 32/b, N] fp32."""
    spec = packed.spec
    b, h, vpw, run = spec.bits, spec.salient_bits, spec.values_per_word, spec.run
    n = spec.out_features
    words = packed.qweight[r0:r1]  # [R, N]
    i = torch.arange(vpw, dtype=torch.int32)
    low = (words.unsqueeze(1) >> (b * i).view(1, -1, 1)) & ((1 << b) - 1)  # [R, vpw, N]
    high = (words.unsqueeze(1) >> (h * (i // run)).view(1, -1, 1)) & ((1 << h) - 1)
    rows = torch.arange(r0 * vpw, r1 * vpw)
    g = rows // GROUP
    sal = ((packed.bitmap[g // 8].to(torch.int32) >> (g % 8).to(torch.int32).unsqueeze(1)) & 1).bool()
    sg, hg = rows // spec.group_size, rows // spec.salient_group_size
    w_low = (low.reshape(-1, n).float() - packed.zeros[sg].float()) * packed.scales[sg].float()
    w_high = (high.reshape(-1, n).float() - packed.hzeros[hg].float()) * packed.hscales[hg].float()
    return torch.where(sal, w_high, w_low)


def packed_matmul_torch(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None,
                        out: torch.Tensor | None = None, k_tile: int = TORCH_K_TILE) -> torch.Tensor:
    """Pure-torch CPU path (the fallback): dequantize K tiles of k_tile rows transiently and multiply."""
    _check_args(x, packed, out)
    spec = packed.spec
    k, n = spec.in_features, spec.out_features
    lead = x.shape[:-1]
    xf = x.reshape(-1, k).to(torch.float32)
    y = torch.zeros(xf.shape[0], n) if bias is None else bias.float().expand(xf.shape[0], n).clone()
    rows_per_tile = max(spec.words_per_group, k_tile // spec.values_per_word // spec.words_per_group
                        * spec.words_per_group)
    for r0 in range(0, spec.qweight_rows, rows_per_tile):
        r1 = min(r0 + rows_per_tile, spec.qweight_rows)
        k0, k1 = r0 * spec.values_per_word, min(r1 * spec.values_per_word, k)
        if k0 >= k:
            break
        w = dequantize_tile_torch(packed, r0, r1)[: k1 - k0]
        y.addmm_(xf[:, k0:k1], w)
    y = y.view(*lead, n).to(x.dtype)
    if out is None:
        return y
    return out.copy_(y)
