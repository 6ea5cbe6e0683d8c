"""Plain statistics the engine emits; server/metrics.py turns them into Prometheus series."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestStats:
    """One finished sequence; times in seconds."""
    finish_reason: str           # stop | length | abort | error
    prompt_tokens: int
    generation_tokens: int
    queue_time: float            # arrival -> admitted to a slot
    time_to_first_token: float | None  # arrival -> first token (None if none came)
    inter_token_latencies: tuple[float, ...]
    e2e_latency: float           # arrival -> finished


@dataclass(frozen=True)
class EngineSnapshot:
    num_running: int
    num_waiting: int
    kv_cache_usage_bytes: int    # bytes of the KV-cache blocks held by sequences (in the cache's dtype)
    kv_cache_capacity_bytes: int  # bytes of the whole block pool
    kv_cache_usage_16bit_bytes: int = 0     # the same blocks in a 16-bit cache
    kv_cache_capacity_16bit_bytes: int = 0  # the same pool in a 16-bit cache
    kv_cache_blocks_used: int = 0
    kv_cache_blocks_free: int = 0
    num_preemptions: int = 0      # sequences preempted (recomputed later) because the pool was full
