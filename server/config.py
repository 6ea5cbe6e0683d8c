"""Server configuration: one frozen dataclass, defaults in one place."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, get_args

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
CpuActivations = Literal["auto", "int8", "float"]
KVCacheDtype = Literal["auto", "fp32", "fp16", "int8", "int4"]
KV_CACHE_DTYPES: tuple[str, ...] = get_args(KVCacheDtype)  # the CLI's choices and the check below

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """'2GiB', '512 MiB', '1.5GB', '1000000' -> bytes."""
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = t[len(num):].strip()
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise ValueError(f"not a memory size: {text!r} (e.g. 2GiB, 512MiB, 1e9)")
    return int(value * _UNITS[unit])


DEFAULT_KV_CACHE_MEMORY = 4 << 30


@dataclass(frozen=True)
class ServerConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    served_model_name: Optional[str] = None
    max_num_seqs: int = 16          # sequences decoded together in one batch
    max_queue: int = 256            # sequences admitted but waiting for a slot; beyond this -> 429
    # Prompt tokens prefilled per engine step (chunked prefill), before each decode step; chosen by measurement
    # (docs/RESULTS.md, benchmarks/prefill_stall.py): 32 kept running streams within 2 decode steps, the whole
    # prompt at once stalled them 6-19 steps; 64 is between in stalls and in time to first token.
    max_prefill_tokens: int = 64
    # A prompt longer than max_prefill_tokens that arrives while streams decode is prefilled on a helper thread
    # beside the decode steps, the cores split between them (server/engine.py), where the native CPU step serves
    # and two or more threads are set; False: its chunks ride in the decode steps.
    prefill_beside: bool = True
    max_model_len: Optional[int] = None  # prompt + generation, tokens; None -> the model's own limit
    device: Device = "auto"
    dtype: DType = "auto"           # auto -> float32 on CPU, bfloat16 on CUDA
    log_level: str = "info"
    verify: bool = True             # check the checkpoint's files against its manifest (sizes, sha256) at load
    max_request_bytes: int = 4 << 20  # larger request bodies get 413 before they are read; 0: no limit
    threads: Optional[int] = None   # torch CPU threads; None: all of torch's (server/__main__.py)
    # Threads for engine steps of at least Engine.BATCH_ROWS rows (a decode batch or a prefill chunk), where the
    # compute outweighs what the HTTP side loses; None: all of torch's threads when `threads` is left to its
    # default, else `threads` (like llama.cpp's --threads-batch)
    threads_batch: Optional[int] = None
    # Decode activations of the CPU kernel for h = b layers: int8 (integer dot products) or float; auto keeps
    # MAMP_CPU_ACTIVATIONS (default int8)
    cpu_activations: CpuActivations = "auto"
    # KV cache: keys and values as floats (auto: 16-bit, fp16 under fp32 compute; fp32; fp16), or quantized on write
    # (int8: per token and head, symmetric; int4: per token and head, asymmetric; kernels/kv_quant.py), in blocks
    # of 16 tokens from one pool
    kv_cache_dtype: KVCacheDtype = "auto"
    # The pool's size in bytes; None: enough for max_num_seqs sequences of max_model_len, at most
    # DEFAULT_KV_CACHE_MEMORY (pages are committed as blocks are first used, so memory follows live tokens)
    kv_cache_memory: Optional[int] = None
    # Tokens per KV block: the unit of allocation. Larger blocks read faster at long contexts (docs/RESULTS.md:
    # 16 x 1,024-token steps 95.9 ms at 16, 82.6 at 64, 75.1 at 256) and reserve up to a block per sequence unused
    kv_block_size: int = 16

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.threads_batch is not None and self.threads_batch < 1:
            raise ValueError(f"threads_batch must be >= 1, got {self.threads_batch}")
        if self.max_request_bytes < 0:
            raise ValueError(f"max_request_bytes must be >= 0, got {self.max_request_bytes}")
        if self.cpu_activations not in ("auto", "int8", "float"):
            raise ValueError(f"cpu_activations must be auto, int8 or float, got {self.cpu_activations!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be {', '.join(KV_CACHE_DTYPES[:-1])} or {KV_CACHE_DTYPES[-1]}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not 1 <= self.kv_block_size <= 4096:
            raise ValueError(f"kv_block_size must be in 1 .. 4096, got {self.kv_block_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    @property
    def model_name(self) -> str:
        """The name clients must send in `model` (defaults to the checkpoint folder's name)."""
        return self.served_model_name or Path(self.model).resolve().name
