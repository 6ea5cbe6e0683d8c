"""Runs a loaded HF Llama-family model (Llama, Mistral, Qwen2/3) with its own RoPE, attention and KV cache; each
layer through the stages of mamp.kernels.llama_block (the same decomposition calibration uses).

Prefill is one request at a time (M = prompt length); decode is one forward over all running sequences
(M = number of sequences), each at its own position, with a length mask. The decoder's linear layers may
be nn.Linear or any module with the same call contract (mamp's PackedLinear): they are just called.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mamp.kernels.llama_block import LlamaBlock, rms_norm
from mamp.kernels.native_decode import native_decode_layer, native_decode_stack, why_not
from mamp.kernels.paged_attention import choose_decode_attention

from .kv_cache import BLOCK_SIZE, PagedKVCache


def _rope_inv_freq(model: nn.Module, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] and the cos/sin scale; HF's own table when it has one, so scaled
    RoPE variants (llama3, yarn) come out identical; otherwise computed from rope_theta."""
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is not None and hasattr(rotary, "inv_freq"):
        return rotary.inv_freq.float(), float(getattr(rotary, "attention_scaling", 1.0))
    config = model.config
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)), 1.0


SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


class BatchedLlama:
    def __init__(self, model: nn.Module, max_num_seqs: int, max_model_len: int, kv_cache_dtype: str = "auto",
                 kv_cache_blocks: int | None = None, kv_block_size: int = BLOCK_SIZE):
        """kv_cache_dtype: auto (16-bit: server/kv_cache.resolve_kind), fp32, fp16, int8 or int4; kv_cache_blocks:
        the pool's blocks of kv_block_size tokens (None: enough for max_num_seqs sequences of max_model_len)."""
        config = model.config
        if config.model_type not in SUPPORTED:
            raise ValueError(f"model_type {config.model_type!r} is not served; supported: {', '.join(SUPPORTED)}")
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and max_model_len > window:
            raise ValueError(f"sliding-window attention is not implemented: use --max-model-len <= {window}")
        self.model = model
        self.layers = list(model.model.layers)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.vocab_size = config.vocab_size
        self.max_model_len = max_model_len
        param = next(model.parameters())
        self.device, self.dtype = param.device, _compute_dtype(model)
        inv_freq, self.rope_scale = _rope_inv_freq(model, self.head_dim)
        self.inv_freq = inv_freq.to(self.device)
        self.blocks = [LlamaBlock(layer, self.num_heads, self.num_kv_heads, self.head_dim, fuse=True)
                       for layer in self.layers]
        # RoPE of every position, computed once (decode and prefill index it; int4's key centering rotates by it).
        self._cos, self._sin = (t[0, 0] for t in self._rope(torch.arange(max_model_len, device=self.device)[None]))
        self.cache = PagedKVCache(len(self.layers), max_num_seqs, self.num_kv_heads, self.head_dim,
                                  max_model_len, self.device, self.dtype, kv_cache_dtype, kv_cache_blocks,
                                  kv_block_size, rope=(self._cos, self._sin) if kv_cache_dtype == "int4" else None)
        # The decode step in native code, one call per layer, where every layer allows it (else None and the
        # Python stages serve; kernels/native_decode.py says when it applies).
        self.head_threads = 0  # threads for the lm_head call (0: as set); the engine sets it (server/engine.py)
        cpu_fp32 = self.device.type == "cpu" and self.dtype == torch.float32
        self.native_reason = "not on the CPU in fp32" if not cpu_fp32 else next(
            (r for r in map(why_not, self.blocks) if r is not None), None)
        self.native = None if self.native_reason else [native_decode_layer(blk) for blk in self.blocks]
        # The same layers as one call per step (the decode path's), so this thread takes Python's lock once per step.
        self.native_stack = None if self.native_reason else native_decode_stack(self.blocks)
        self.attention, self.attention_reason = choose_decode_attention(self.device)  # the Python path's

    def _rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """_rope's values read from the table of every position (positions [B, T] below max_model_len)."""
        return self._cos[positions][:, None], self._sin[positions][:, None]

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, head_dim]."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(self.dtype)[:, None]
        sin = (emb.sin() * self.rope_scale).to(self.dtype)[:, None]
        return cos, sin

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        x = rms_norm(self.model.model.norm, h)
        threads = self.head_threads
        if threads and threads != torch.get_num_threads():  # one large call: worth all cores (one barrier)
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return self.model.lm_head(x).float()
            finally:
                torch.set_num_threads(before)
        return self.model.lm_head(x).float()

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int], all_logits: bool = False, start: int = 0) -> torch.Tensor:
        """Writes the K/V of token_ids, at positions start .. start + T - 1, into `slot` (whose positions before
        `start` are cached: a chunk of a longer prompt); returns float32 logits [T, V] (all_logits) or [V] (last)."""
        t = len(token_ids)
        end = start + t
        cache = self.cache
        cache.ensure(slot, end)
        ids = torch.tensor([token_ids], device=self.device)
        cos, sin = self._rope_at(torch.arange(start, end, device=self.device)[None])
        h = self.model.model.embed_tokens(ids)
        # A later chunk attends to the cached prefix and causally within itself: query i sees keys 0 .. start + i.
        # A quantized cache is read back for every key, this chunk's too, so a token's attention is the same
        # whichever chunk or decode step computes it.
        in_place = start == 0 and cache.kind in ("auto", "fp32")  # entries stored as computed
        mask = None if in_place else (torch.arange(end, device=self.device)[None]
                                      <= torch.arange(start, end, device=self.device)[:, None])
        rows = torch.tensor([slot], device=self.device)
        for i, blk in enumerate(self.blocks):
            q, k, v = blk.qkv(blk.attn_in(h), cos, sin)
            cache.write(i, slot, start, k[0], v[0])
            if in_place:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                keys, values = cache.read(i, rows, end)
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
            mid = blk.mid(h, o.transpose(1, 2).reshape(1, t, -1))
            h = blk.out(mid, blk.mlp_act(blk.mlp_in(mid)))
        return self._logits(h[0] if all_logits else h[0, -1])

    def release(self, slot: int) -> None:
        """The sequence in `slot` has ended: its cache blocks go back to the pool."""
        self.cache.release(slot)

    @torch.inference_mode()
    def decode(self, slots: list[int], token_ids: list[int], positions: list[int],
               logit_rows: list[int] | None = None) -> torch.Tensor:
        """One new token per row: token_ids[i] sits at positions[i] of the sequence in slots[i] (whose
        earlier positions are cached). Returns float32 logits [B, V], or [len(logit_rows), V] for those rows only.

        With the native step (`mixed_prefill`), rows may also be a prompt chunk: consecutive positions of one slot,
        one row each. Every row's K/V is written before any row attends, and row i attends to positions
        0 .. positions[i] of its sequence, so a chunk is causal within itself and sees what earlier chunks cached
        (a prefill as runner.prefill computes it, batched with the decode rows in one call)."""
        b = len(slots)
        cache = self.cache
        for slot, p in zip(slots, positions):
            cache.ensure(slot, p + 1)
        slot_idx = torch.tensor(slots, device=self.device)
        pos = torch.tensor(positions, device=self.device)
        cos, sin = self._rope_at(pos[:, None])
        h = self.model.model.embed_tokens(torch.tensor(token_ids, device=self.device)[:, None])
        if self.native is not None:  # every layer in one C++ call, each reading its sequences' blocks in place
            tensors = [t for i in range(len(self.blocks)) for t in cache.layer_tensors(i)]
            h = self.native_stack.forward(h[:, 0], tensors, cache.tables, slot_idx, pos, cos.view(b, -1),
                                          sin.view(b, -1))
            return self._logits(h if logit_rows is None else h[logit_rows])
        # The Python path: each layer's attention reads the sequences' blocks through self.attention (the Triton
        # kernel in place on CUDA; elsewhere the reference, which gathers them into a dense copy).
        for i, blk in enumerate(self.blocks):
            q, k, v = blk.qkv(blk.attn_in(h), cos, sin)
            cache.write_tokens(i, slot_idx, pos, k[:, :, 0], v[:, :, 0])
            o = self.attention(q[:, :, 0], cache.layer_tensors(i), cache.tables, slot_idx, pos)  # [B, H, D]
            mid = blk.mid(h, o.reshape(b, 1, -1))
            h = blk.out(mid, blk.mlp_act(blk.mlp_in(mid)))
        return self._logits(h[:, 0] if logit_rows is None else h[logit_rows, 0])

    @property
    def mixed_prefill(self) -> bool:
        """Whether decode() takes prompt-chunk rows beside the decode rows: with the native step, on an fp32,
        fp16 or int8 cache (an int4 cache's per-sequence key centers are set by the Python prefill)."""
        return self.native_stack is not None and self.cache.kind in ("auto", "fp32", "fp16", "int8")


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The activations' dtype: the embedding's output dtype (packed weights are integer tensors; a 16-bit table
    kept under fp32 compute says so in HalfEmbedding.compute_dtype)."""
    emb = model.model.embed_tokens
    dtype = getattr(emb, "compute_dtype", None)  # HalfEmbedding, PackedEmbedding (which has no weight)
    return dtype if dtype is not None else emb.weight.dtype
