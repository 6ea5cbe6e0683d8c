"""Every Prometheus series the server exposes, named mamp:<what>_<unit> and labelled model_name.

The engine emits plain stats (server/stats.py); this module turns them into series. Each app owns its own
CollectorRegistry, so several servers can live in one process (tests)."""
from __future__ import annotations

import os
import resource
from typing import Callable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from .model_loader import ModelInfo
from .stats import EngineSnapshot, RequestStats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
LATENCY_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                   40.0, 50.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def resident_memory_bytes() -> int:
    """Current resident set size of this process (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cuda_bytes(kind: str) -> int:
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return 0
    return torch.cuda.memory_allocated() if kind == "allocated" else torch.cuda.memory_reserved()


def _saving(snap: EngineSnapshot) -> float:
    return 1.0 - snap.kv_cache_capacity_bytes / snap.kv_cache_capacity_16bit_bytes if snap.kv_cache_capacity_16bit_bytes else 0.0


class _PreemptionCollector(Collector):
    """mamp:num_preemptions_total, a counter the engine keeps (read at scrape time)."""

    def __init__(self, model_name: str, snapshot: Callable[[], EngineSnapshot]):
        self.model_name, self.snapshot = model_name, snapshot

    def collect(self):
        c = CounterMetricFamily("mamp:num_preemptions", "Sequences preempted because the KV cache was full "
                                "(recomputed when blocks free up).", labels=["model_name"])
        c.add_metric([self.model_name], self.snapshot().num_preemptions)
        yield c


class ServerMetrics:
    def __init__(self, model_name: str, info: ModelInfo, snapshot: Callable[[], EngineSnapshot]):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        label = {"model_name": model_name}
        reg = self.registry

        def gauge(name: str, doc: str, fn: Callable[[], float]) -> None:
            Gauge(name, doc, ["model_name"], registry=reg).labels(**label).set_function(fn)

        gauge("mamp:weight_memory_bytes", "Model weights as loaded (packed), bytes.", lambda: info.weight_bytes)
        gauge("mamp:weight_memory_bf16_bytes", "The same weights stored as bf16, bytes.",
              lambda: info.weight_bf16_bytes)
        gauge("mamp:weight_memory_saving_ratio", "1 - packed / bf16 weight bytes.", lambda: info.saving_ratio)
        gauge("mamp:process_resident_memory_bytes", "Resident memory of the server process, bytes.",
              resident_memory_bytes)
        gauge("mamp:cuda_memory_allocated_bytes", "torch.cuda.memory_allocated (0 on CPU).",
              lambda: _cuda_bytes("allocated"))
        gauge("mamp:cuda_memory_reserved_bytes", "torch.cuda.memory_reserved (0 on CPU).",
              lambda: _cuda_bytes("reserved"))
        gauge("mamp:kv_cache_usage_bytes", "KV-cache blocks held by sequences, bytes (in the cache's dtype).",
              lambda: snapshot().kv_cache_usage_bytes)
        gauge("mamp:kv_cache_capacity_bytes", "The KV-cache block pool, bytes (in the cache's dtype).",
              lambda: snapshot().kv_cache_capacity_bytes)
        gauge("mamp:kv_cache_usage_16bit_bytes", "The blocks in use as a 16-bit cache would hold them, bytes.",
              lambda: snapshot().kv_cache_usage_16bit_bytes)
        gauge("mamp:kv_cache_capacity_16bit_bytes", "The pool's tokens in a 16-bit cache, bytes.",
              lambda: snapshot().kv_cache_capacity_16bit_bytes)
        gauge("mamp:kv_cache_saving_ratio", "1 - KV cache bytes / 16-bit bytes for the same tokens.",
              lambda: _saving(snapshot()))
        gauge("mamp:kv_cache_blocks_used", "KV-cache blocks held by sequences.", lambda: snapshot().kv_cache_blocks_used)
        gauge("mamp:kv_cache_blocks_free", "Free KV-cache blocks.", lambda: snapshot().kv_cache_blocks_free)
        reg.register(_PreemptionCollector(model_name, snapshot))
        gauge("mamp:num_requests_running", "Sequences in the running batch.", lambda: snapshot().num_running)
        gauge("mamp:num_requests_waiting", "Sequences waiting for a slot.", lambda: snapshot().num_waiting)

        kernels = Gauge("mamp:kernel_layers", "Linear layers served by each kernel (chosen at load; torch: an "
                        "unquantized checkpoint).",
                        ["model_name", "kernel"], registry=reg)
        for kernel, count in info.kernels:
            kernels.labels(model_name=model_name, kernel=kernel).set(count)

        self.finished = Counter("mamp:requests_finished", "Finished sequences by finish reason.",
                                ["model_name", "finish_reason"], registry=reg)
        self.failed = Counter("mamp:requests_failed", "Requests answered with an error, by HTTP status.",
                              ["model_name", "status_code"], registry=reg)
        self.prompt_tokens = Counter("mamp:prompt_tokens", "Prefilled prompt tokens.",
                                     ["model_name"], registry=reg).labels(**label)
        self.generation_tokens = Counter("mamp:generation_tokens", "Generated tokens.",
                                         ["model_name"], registry=reg).labels(**label)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=reg).labels(**label)

        self.ttft = histogram("mamp:time_to_first_token_seconds", "Arrival to first token, seconds.",
                              TTFT_BUCKETS)
        self.itl = histogram("mamp:inter_token_latency_seconds", "Between consecutive tokens, seconds.",
                             ITL_BUCKETS)
        self.e2e = histogram("mamp:e2e_request_latency_seconds", "Arrival to finish, seconds.", LATENCY_BUCKETS)
        self.queue_time = histogram("mamp:request_queue_time_seconds", "Arrival to a KV-cache slot, seconds.",
                                    LATENCY_BUCKETS)
        self.request_prompt_tokens = histogram("mamp:request_prompt_tokens", "Prompt tokens per sequence.",
                                               TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("mamp:request_generation_tokens",
                                                   "Generated tokens per sequence.", TOKEN_BUCKETS)

    def observe_finished(self, stats: RequestStats) -> None:
        """Called by the engine thread once per finished sequence."""
        self.finished.labels(model_name=self.model_name, finish_reason=stats.finish_reason).inc()
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generation_tokens.inc(stats.generation_tokens)
        if stats.time_to_first_token is not None:
            self.ttft.observe(stats.time_to_first_token)
        for itl in stats.inter_token_latencies:
            self.itl.observe(itl)
        self.e2e.observe(stats.e2e_latency)
        self.queue_time.observe(stats.queue_time)
        self.request_prompt_tokens.observe(stats.prompt_tokens)
        self.request_generation_tokens.observe(stats.generation_tokens)

    def record_failure(self, status_code: int) -> None:
        self.failed.labels(model_name=self.model_name, status_code=str(status_code)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
