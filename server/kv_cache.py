"""Slot-based KV cache: one row per running sequence, grown along the token axis on demand."""
from __future__ import annotations

import torch


class SlotKVCache:
    """Per layer, k and v of shape [num_slots, num_kv_heads, capacity, head_dim].

    `capacity` starts small and doubles (up to `max_len`) when a sequence needs more, so a long
    --max-model-len costs memory only once some request is that long.
    """

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 max_len: int, device: torch.device, dtype: torch.dtype, initial_len: int = 256):
        self.num_layers, self.num_slots = num_layers, num_slots
        self.num_kv_heads, self.head_dim, self.max_len = num_kv_heads, head_dim, max_len
        self.device, self.dtype = device, dtype
        self.capacity = min(max_len, initial_len)
        shape = (num_slots, num_kv_heads, self.capacity, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers, bytes."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    @property
    def capacity_bytes(self) -> int:
        return self.bytes_per_token * self.num_slots * self.capacity

    def ensure_capacity(self, length: int) -> None:
        """Grow the token axis so that positions [0, length) fit."""
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds the cache limit of {self.max_len}")
        if length <= self.capacity:
            return
        new_cap = self.capacity
        while new_cap < length:
            new_cap *= 2
        new_cap = min(new_cap, self.max_len)
        pad = (self.num_slots, self.num_kv_heads, new_cap - self.capacity, self.head_dim)
        for cache in (self.k, self.v):
            for i, t in enumerate(cache):
                cache[i] = torch.cat([t, torch.zeros(pad, device=self.device, dtype=self.dtype)], dim=2)
        self.capacity = new_cap
