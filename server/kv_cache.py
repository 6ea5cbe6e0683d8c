"""Paged KV cache: fixed-size blocks of tokens from one pool, a block table per sequence row, and keys and values
stored as floats (fp32, fp16; `auto`: 16-bit, resolve_kind) or quantized to int8 / int4 (kernels/kv_quant.py).

    cache = PagedKVCache(layers, rows, kv_heads, head_dim, max_len, device, dtype, kind="int8", num_blocks=4096)
    cache.ensure(row, length)     # blocks for positions [0, length) of the sequence in `row` (NoFreeBlocks if not)
    cache.write(layer, row, start, k, v)   # prefill: k, v [kv_heads, T, head_dim] at positions start ...
    keys, values = cache.read(layer, rows, length)  # dense, dequantized (the Python path; native code reads in place)
    cache.release(row)            # its blocks go back to the pool

Per layer the pool is k, v [kv_heads, num_blocks, block_size, head_dim] (int4: head_dim / 2 bytes of two codes),
with per token and head fp16 scales (int8, int4) and zeros (int4) [kv_heads, num_blocks, block_size]. Head-major,
so that a sequence whose blocks are consecutive reads each head's entries as one stream (blocks are handed out
lowest first, so a prompt's blocks usually are). `tables`
[rows, max_blocks] int32 maps a row's i-th block of block_size positions to its pool block. The pool is
allocated once and left uninitialised: the OS commits its pages when blocks are first written, and blocks are
handed out lowest first, so resident memory follows the most tokens live at once, not rows x max_len.

int4 keys are stored centered (kernels/kv_quant.py): each row has a per-layer key mean `centers[layer][row]`
[kv_heads, head_dim] fp32, set from its first chunk (write at start 0), and the key at position p is stored as
k - R(p) mu with R(p) from the RoPE tables `rope` (cos, sin [max_len, head_dim], kept as `rope_half`; the identity without them);
read adds R(p) mu back. Position 0 of an int4 row (the first token: the attention sink, an outlier that draws
much of the attention) is kept exact in `sinks[layer][row]` [2, kv_heads, head_dim] fp32 (k, v, Hadamard-rotated
as the native code reads them), and read from there instead of the pool.
"""
from __future__ import annotations

import heapq

import torch

from mamp.kernels import kv_quant
from mamp.kernels.paged_attention import read_dense, rope_at

BLOCK_SIZE = 16
KINDS = kv_quant.KINDS


class NoFreeBlocks(RuntimeError):
    """The pool has fewer free blocks than a sequence needs."""


class BlockAllocator:
    """Block ids 0 .. num_blocks - 1; the lowest free ids first (compact pages)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))  # a sorted list is a valid min-heap
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocks(f"{n} blocks wanted, {len(self._free)} free")
        blocks = [heapq.heappop(self._free) for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"block {b} is not in use")
            self._used.remove(b)
            heapq.heappush(self._free, b)


def resolve_kind(kind: str, dtype: torch.dtype) -> str:
    """What `auto` stores for a model computing in `dtype`: a 16-bit cache, as llama.cpp and vLLM keep one: the
    compute dtype where it is 16-bit, fp16 where the model computes in fp32 (the CPU). Other kinds as they are."""
    if kind == "auto" and dtype == torch.float32:
        return "fp16"
    return kind


def bytes_per_token(kind: str, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of one token across all layers, bytes, with scales and zeros."""
    kind = resolve_kind(kind, dtype)
    if kind == "auto":
        per_head = head_dim * torch.empty((), dtype=dtype).element_size()
    elif kind in ("fp32", "fp16"):
        per_head = head_dim * kv_quant.STORAGE[kind].itemsize
    else:
        per_head = kv_quant.code_dim(kind, head_dim) + (2 if kind == "int8" else 4)
    return 2 * num_layers * num_kv_heads * per_head


class PagedKVCache:
    def __init__(self, num_layers: int, num_rows: int, num_kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device, dtype: torch.dtype, kind: str = "auto", num_blocks: int | None = None,
                 block_size: int = BLOCK_SIZE, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        if kind not in KINDS:
            raise ValueError(f"kv cache dtype must be one of {', '.join(KINDS)}, got {kind!r}")
        kind = resolve_kind(kind, dtype)
        self.num_layers, self.num_rows, self.max_len = num_layers, num_rows, max_len
        self.num_kv_heads, self.head_dim, self.block_size = num_kv_heads, head_dim, block_size
        self.device, self.dtype, self.kind = device, dtype, kind
        self.max_blocks = -(-max_len // block_size)
        num_blocks = num_blocks if num_blocks is not None else num_rows * self.max_blocks
        self.allocator = BlockAllocator(num_blocks)
        self.num_blocks = num_blocks
        self.tables = torch.zeros(num_rows, self.max_blocks, dtype=torch.int32, device=device)
        self._row_blocks: list[list[int]] = [[] for _ in range(num_rows)]
        shape = (num_kv_heads, num_blocks, block_size)  # head-major: a head's consecutive blocks are adjacent
        store = dtype if kind == "auto" else kv_quant.STORAGE[kind]
        cd = kv_quant.code_dim(kind, head_dim)
        self.k = [torch.empty(*shape, cd, device=device, dtype=store) for _ in range(num_layers)]
        self.v = [torch.empty(*shape, cd, device=device, dtype=store) for _ in range(num_layers)]
        n_meta = {"auto": 0, "fp32": 0, "fp16": 0, "int8": 1, "int4": 2}[kind]  # scales, then zeros
        self.meta = [[torch.empty(shape, device=device, dtype=torch.float16) for _ in range(2 * n_meta)]
                     for _ in range(num_layers)]  # per layer: k_scale, v_scale[, k_zero, v_zero]
        self.centers: list[torch.Tensor] = []
        self.sinks: list[torch.Tensor] = []
        if kind == "int4":  # per row and layer: the key mean (kernels/kv_quant.py), position 0 exact, and the RoPE
            # tables the mean rotates by
            self.centers = [torch.zeros(num_rows, num_kv_heads, head_dim, device=device) for _ in range(num_layers)]
            self.sinks = [torch.zeros(num_rows, 2, num_kv_heads, head_dim, device=device) for _ in range(num_layers)]
            if rope is None:
                rope = (torch.ones(max_len, head_dim, device=device), torch.zeros(max_len, head_dim, device=device))
            cos, sin = (t.float().reshape(-1, head_dim).contiguous() for t in rope)
            if cos.shape[0] < max_len or sin.shape != cos.shape:
                raise ValueError(f"rope tables {tuple(cos.shape)}, {tuple(sin.shape)} do not cover {max_len} positions")
            h = head_dim // 2
            if not (torch.equal(cos[:, :h], cos[:, h:]) and torch.equal(sin[:, :h], sin[:, h:])):
                raise ValueError("rope tables must repeat one frequency per pair (i, i + head_dim / 2)")
            # [head_dim, max_len]: each pair's cosines, then its sines (what the native layer reads; rope_at)
            self.rope_half = torch.cat((cos[:, :h], sin[:, :h]), 1).t().contiguous()

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.kind, self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    @property
    def bytes_per_token_16bit(self) -> int:
        """What one token would take in a 16-bit cache (the usual baseline)."""
        return bytes_per_token("auto", self.num_layers, self.num_kv_heads, self.head_dim, torch.bfloat16)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_tokens * self.bytes_per_token

    @property
    def usage_bytes(self) -> int:
        """Bytes of the blocks held by sequences."""
        return self.allocator.num_used * self.block_size * self.bytes_per_token

    def blocks_for(self, length: int) -> int:
        return -(-length // self.block_size)

    def blocks_needed(self, row: int, length: int) -> int:
        """Blocks `row` still needs to hold positions [0, length)."""
        return max(0, self.blocks_for(length) - len(self._row_blocks[row]))

    # ---- blocks --------------------------------------------------------------------------------
    def ensure(self, row: int, length: int) -> None:
        """Blocks for positions [0, length) of `row`; raises NoFreeBlocks (allocating nothing) if the pool is short."""
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds the cache limit of {self.max_len}")
        need = self.blocks_needed(row, length)
        if need:
            have = self._row_blocks[row]
            new = self.allocator.allocate(need)
            self.tables[row, len(have):len(have) + need] = torch.tensor(new, dtype=torch.int32)
            have.extend(new)

    def release(self, row: int) -> None:
        self.allocator.free(self._row_blocks[row])
        self._row_blocks[row] = []

    def row_blocks(self, row: int) -> list[int]:
        return list(self._row_blocks[row])

    # ---- the reference reads and writes (native code does the same in place) ------------------------------
    def layer_tensors(self, layer: int) -> list[torch.Tensor]:
        """k, v[, k_scale, v_scale[, k_zero, v_zero, key centers, sinks, rope table]]: what the native decode layer
        reads and writes (the rope table [head_dim, max_len]: row i < head_dim / 2 the cosines of pair i at each
        position, row head_dim / 2 + i its sines)."""
        extra = [self.centers[layer], self.sinks[layer], self.rope_half] if self.centers else []
        return [self.k[layer], self.v[layer], *self.meta[layer], *extra]

    def _key_offsets(self, layer: int, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """R(p) mu of rows[b] at positions [b, t]: [B, kv_heads, T, head_dim] fp32 (int4's centered keys)."""
        mu = self.centers[layer][rows][:, :, None]  # [B, KVH, 1, D]
        cos, sin = rope_at(self.rope_half, positions)  # [B, T, D]
        return kv_quant.rope_rotate(mu, cos[:, None], sin[:, None])

    def _store(self, layer: int, blocks: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v [N, kv_heads, head_dim] to (:, blocks[n], offsets[n])."""
        if self.kind in ("auto", "fp32", "fp16"):
            self.k[layer][:, blocks, offsets] = k.transpose(0, 1).to(self.k[layer].dtype)
            self.v[layer][:, blocks, offsets] = v.transpose(0, 1).to(self.v[layer].dtype)
            return
        meta = self.meta[layer]
        for j, (pool, x) in enumerate(((self.k[layer], k), (self.v[layer], v))):
            codes, scale, zero = kv_quant.quantize(x, self.kind)
            pool[:, blocks, offsets] = codes.transpose(0, 1)
            meta[j][:, blocks, offsets] = scale.transpose(0, 1)
            if zero is not None:
                meta[2 + j][:, blocks, offsets] = zero.transpose(0, 1)

    def write(self, layer: int, row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [kv_heads, T, head_dim]: positions start .. start + T - 1 of `row` (blocks already ensured)."""
        pos = torch.arange(start, start + k.shape[1], device=self.device)
        if self.centers:
            if start == 0:
                cos, sin = rope_at(self.rope_half, pos)
                self.centers[layer][row] = kv_quant.key_center(k, cos, sin)
                self.sinks[layer][row, 0], self.sinks[layer][row, 1] = kv_quant.rotate(k[:, 0]), kv_quant.rotate(v[:, 0])
            rows = torch.tensor([row], device=self.device)
            k = (k.float() - self._key_offsets(layer, rows, pos[None])[0]).to(k.dtype)
        blocks = self.tables[row, pos // self.block_size].long()
        self._store(layer, blocks, pos % self.block_size, k.transpose(0, 1), v.transpose(0, 1))

    def write_tokens(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> None:
        """One token per row: k, v [B, kv_heads, head_dim] at positions[b] of rows[b]."""
        if self.centers:
            first = positions == 0
            if bool(first.any()):
                self.sinks[layer][rows[first]] = kv_quant.rotate(torch.stack((k[first], v[first]), 1))
            k = (k.float() - self._key_offsets(layer, rows, positions[:, None])[:, :, 0]).to(k.dtype)
        blocks = self.tables[rows, positions // self.block_size].long()
        self._store(layer, blocks, positions % self.block_size, k, v)

    def read(self, layer: int, rows: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, length) of each row: [B, kv_heads, length, head_dim] in the compute
        dtype (a copy; kernels/paged_attention.read_dense). Positions a row has not written hold whatever its
        blocks hold: mask them."""
        return read_dense(self.layer_tensors(layer), self.tables, rows, length, self.dtype)
