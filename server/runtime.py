"""Everything a server instance holds, built from a ServerConfig: model, runner, engine, services, metrics."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from mamp.kernels import cpu_matmul

from .batched_llama import BatchedLlama
from .config import ServerConfig
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
    runner = BatchedLlama(model, config.max_num_seqs, max_len)
    engine = Engine(runner, tokenizer, config.max_num_seqs, config.max_queue,
                    on_finished=lambda stats: metrics.observe_finished(stats),
                    max_prefill_tokens=config.max_prefill_tokens,
                    threads=(config.threads, config.threads_batch) if config.threads and config.threads_batch else None)
    metrics = ServerMetrics(config.model_name, info, engine.snapshot)
    ctx = ServingContext(engine, tokenizer, config.model_name, max_len, runner.vocab_size, _eos_ids(model, tokenizer))
    return Runtime(config, info, engine, metrics, CompletionService(ctx), ChatService(ctx), max_len)
