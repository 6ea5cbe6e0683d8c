"""Sampling parameters and the per-sequence sampler (penalties, temperature, top-k, top-p, logprobs)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

_GREEDY_BELOW = 1e-5  # temperatures below this mean argmax
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 or -1: off
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop: tuple[str, ...] = ()          # strings; the text is cut before the first one found
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)  # EOS ids and the like
    ignore_eos: bool = False
    logprobs: Optional[int] = None      # None: none; k: the sampled token's logprob and the top k
    prompt_logprobs: Optional[int] = None  # same, for every prompt token (echo with logprobs)


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: Optional[float] = None                     # of token_id, under the model's raw distribution
    top_logprobs: tuple[tuple[int, float], ...] = ()    # (token_id, logprob), best first


def make_generator(seed: Optional[int], device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def argmax(logits: torch.Tensor) -> int:
    """The first index of the largest value of a 1-D tensor (torch.argmax's answer). On the CPU through NumPy's
    vectorised argmax: 4 us against torch's 43 for a 49,152-entry row (SmolLM2's vocabulary), which a 16-stream
    greedy step paid 16 times."""
    if logits.device.type == "cpu" and logits.dtype in _NUMPY_DTYPES and not logits.requires_grad:
        return int(logits.numpy().argmax())
    return int(logits.argmax())


def top_logprobs(logprobs: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    if k <= 0:
        return ()
    values, ids = logprobs.topk(k)
    return tuple(zip(ids.tolist(), values.tolist()))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
           output_ids: list[int]) -> SampledToken:
    """logits: float32 [V] for one sequence; output_ids: the tokens it generated so far (for penalties)."""
    raw = logits
    penalise = bool(output_ids) and bool(params.presence_penalty or params.frequency_penalty)
    if params.logit_bias or penalise:  # a copy only where it is changed (a 49k-float copy per row and step showed
        logits = logits.clone()        # as 8 % of a 16-stream server's engine thread)
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias)
        logits[list(ids)] += torch.tensor(bias, device=logits.device)
    if penalise:
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.numel())
        counts = counts[: logits.numel()].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    if params.temperature < _GREEDY_BELOW:
        token = argmax(logits)
    else:
        token = _sample_filtered(logits / params.temperature, params, generator)
    if params.logprobs is None:
        return SampledToken(token)
    lp = torch.log_softmax(raw, dim=-1)
    return SampledToken(token, float(lp[token]), top_logprobs(lp, params.logprobs))


def _sample_filtered(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if 0 < params.top_k < logits.numel():
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest prefix reaching top_p
        drop[0] = False  # and always the most likely token (a top_p that rounds to 0 in fp32 would drop all)
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
