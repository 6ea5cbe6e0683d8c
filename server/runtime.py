"""Everything a server instance holds, built from a ServerConfig: model, runner, engine, services, metrics."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from mamp.kernels import cpu_matmul

from . import kv_cache
from .async_engine import deliver
from .batched_llama import BatchedLlama
from .config import DEFAULT_KV_CACHE_MEMORY, ServerConfig
from .engine import Engine
from .metrics import ServerMetrics
from .model_loader import ModelInfo, load_for_serving
from .serving_chat import ChatService
from .serving_common import ServingContext
from .serving_completions import CompletionService

logger = logging.getLogger(__name__)
_MIB = 1 << 20


@dataclass(frozen=True)
class Runtime:
    config: ServerConfig
    info: ModelInfo
    engine: Engine
    metrics: ServerMetrics
    completions: CompletionService
    chat: ChatService
    max_model_len: int

    @property
    def model_name(self) -> str:
        return self.config.model_name


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    ids.add(tokenizer.eos_token_id)
    return frozenset(i for i in ids if i is not None)


def kv_cache_blocks(config: ServerConfig, model, info: ModelInfo, max_len: int) -> int:
    """Blocks in the KV pool: --kv-cache-memory, or max_num_seqs x max_len tokens capped at the default memory;
    a pool that cannot hold one sequence of max_len is a start-up error."""
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    per_token = kv_cache.bytes_per_token(config.kv_cache_dtype, cfg.num_hidden_layers,
                                         getattr(cfg, "num_key_value_heads", None) or heads, head_dim, getattr(torch, info.dtype))
    bs = config.kv_block_size
    per_block = per_token * bs
    need = -(-max_len // bs)  # one sequence of max_len
    if config.kv_cache_memory is None:
        return max(need, min(config.max_num_seqs * need, DEFAULT_KV_CACHE_MEMORY // per_block))
    blocks = config.kv_cache_memory // per_block
    if blocks < need:
        raise ValueError(f"--kv-cache-memory {config.kv_cache_memory} bytes holds {blocks * bs} "
                         f"tokens ({per_token} bytes each as {config.kv_cache_dtype}), fewer than one sequence of "
                         f"--max-model-len {max_len}: give at least {need * per_block} bytes or a smaller "
                         f"--max-model-len")
    return blocks


def build_runtime(config: ServerConfig) -> Runtime:
    if config.cpu_activations != "auto":  # read by the kernel choice at load (kernels/dispatch.py)
        os.environ[cpu_matmul.ACTIVATIONS_ENV] = config.cpu_activations
    model, tokenizer, info = load_for_serving(config.model, config.device, config.dtype, verify=config.verify)
    max_len = config.max_model_len or info.max_position_embeddings
    if max_len > info.max_position_embeddings:
        raise ValueError(f"--max-model-len {max_len} exceeds the model's {info.max_position_embeddings} positions")
    logger.info("weights: %.2f MiB as loaded vs %.2f MiB in bf16 (%.1f%% saved); %s on %s as %s",
                info.weight_bytes / _MIB, info.weight_bf16_bytes / _MIB, 100 * info.saving_ratio,
                "packed mamp checkpoint" if info.quantized else "float checkpoint", info.device, info.dtype)
    blocks = kv_cache_blocks(config, model, info, max_len)
    runner = BatchedLlama(model, config.max_num_seqs, max_len, config.kv_cache_dtype, blocks, config.kv_block_size)
    cache = runner.cache
    logger.info("KV cache: %s, %d blocks of %d tokens = %d tokens, %.1f MiB (%.2fx the tokens of a 16-bit cache)",
                cache.kind if config.kv_cache_dtype != "auto" else f"{cache.kind} (auto)",
                cache.num_blocks, cache.block_size, cache.capacity_tokens, cache.capacity_bytes / _MIB,
                cache.bytes_per_token_16bit / cache.bytes_per_token)
    engine = Engine(runner, tokenizer, config.max_num_seqs, config.max_queue,
                    on_finished=lambda stats: metrics.observe_finished(stats),
                    max_prefill_tokens=config.max_prefill_tokens,
                    threads=(config.threads, config.threads_batch) if config.threads and config.threads_batch else None,
                    deliver=deliver, prefill_beside=config.prefill_beside)
    metrics = ServerMetrics(config.model_name, info, engine.snapshot)
    ctx = ServingContext(engine, tokenizer, config.model_name, max_len, runner.vocab_size, _eos_ids(model, tokenizer))
    return Runtime(config, info, engine, metrics, CompletionService(ctx), ChatService(ctx), max_len)
