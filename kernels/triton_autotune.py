"""A small autotuner for the packed Triton kernels: configs keyed by an M bucket, N, K and the format, chosen by
timing on first use and cached on disk per GPU (~/.cache/mamp/autotune/<gpu-name>.json, or
$MAMP_AUTOTUNE_DIR), so a restart does not re-tune. Nothing runs at import; the GPU is queried on first pick.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelConfig:
    """Meta-parameters of one launch: block sizes (kernel constexprs) plus num_warps / num_stages."""

    blocks: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KernelConfig":
        return cls(blocks=dict(d["blocks"]), num_warps=int(d["num_warps"]), num_stages=int(d["num_stages"]))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """tl.dot operands in fp32 ("ieee"): for fp32 activations, and for bf16 under TRITON_INTERPRET, whose dot
    multiplies bf16 tiles as raw uint16 (triton 3.x interpreter); on a GPU bf16 tiles go to the tensor cores."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def cache_dir() -> Path:
    d = os.environ.get("MAMP_AUTOTUNE_DIR")
    return Path(d) if d else Path.home() / ".cache" / "mamp" / "autotune"


def _device_tag(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unknown"


def gpu_time_ms(fn: Callable[[], object]) -> float:
    """Median GPU ms of one fn() call, timed inside a CUDA graph so that the Python launch path (50-200 us on an
    H200, more than most decode kernels take: docs/RESULTS.md) does not decide between configs. Falls back to
    eager do_bench where the call cannot be captured."""
    from triton.testing import do_bench, do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=20, return_mode="median")
    except Exception:  # noqa: BLE001 - capture unsupported here: time eagerly; a config that fails runs raise again
        return do_bench(fn, warmup=5, rep=20, return_mode="median")


class DiskAutotuner:
    """Picks the fastest of `configs` per key, remembering the choice in memory and in one JSON file per GPU."""

    def __init__(self, name: str, configs: list[KernelConfig], timer: Callable[[Callable], float] | None = None):
        self.name = name
        self.configs = configs
        self.timer = timer  # ms per call of a thunk; None: gpu_time_ms (CUDA-graph timing)
        self._chosen: dict[str, KernelConfig] = {}
        self._loaded: set[str] = set()
        self._lock = threading.Lock()

    def _path(self, tag: str) -> Path:
        return cache_dir() / f"{tag}.json"

    def _load(self, tag: str) -> None:
        if tag in self._loaded:
            return
        self._loaded.add(tag)
        path = self._path(tag)
        if not path.exists():
            return
        try:
            data = json.loads(path.read_text()).get(self.name, {})
            for key, cfg in data.items():
                self._chosen.setdefault(f"{tag}|{key}", KernelConfig.from_dict(cfg))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable autotune cache %s: %s", path, e)

    def _save(self, tag: str, key: str, cfg: KernelConfig) -> None:
        path = self._path(tag)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = json.loads(path.read_text()) if path.exists() else {}
            data.setdefault(self.name, {})[key] = cfg.to_dict()
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except (OSError, ValueError) as e:
            log.warning("could not write autotune cache %s: %s", path, e)

    def pick(self, key: str, device: torch.device, run: Callable[[KernelConfig], object]) -> KernelConfig:
        """The config for `key`: cached, else timed with `run(config)` (a full launch) and saved."""
        if interpreting() or device.type != "cuda":
            return self.configs[0]  # timing the interpreter means nothing
        tag = _device_tag(device)
        full = f"{tag}|{key}"
        with self._lock:
            self._load(tag)
            if full in self._chosen:
                return self._chosen[full]
        timer = self.timer or gpu_time_ms

        best, best_ms = self.configs[0], float("inf")
        for cfg in self.configs:
            try:
                ms = timer(lambda: run(cfg))
            except Exception as e:  # e.g. out of shared memory / registers for this shape: skip the config
                log.debug("config %s failed for %s: %s", cfg, key, e)
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        with self._lock:
            self._chosen[full] = best
            self._save(tag, key, best)
        return best
