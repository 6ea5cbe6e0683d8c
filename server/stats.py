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
    kv_cache_usage_bytes: int    # bytes of KV cache holding live tokens
    kv_cache_capacity_bytes: int  # bytes allocated for the KV cache
