"""What the completions and chat services share: model check, limits, sampling params, submission, SSE."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pydantic import BaseModel

from .async_engine import RequestStream
from .detokenizer import TokenStrings
from .engine import Engine, QueueFullError
from .errors import APIError, bad_request, model_not_found, queue_full
from .protocol import UsageInfo
from .sampling import SamplingParams


@dataclass(frozen=True)
class ServingContext:
    engine: Engine
    tokenizer: object
    model_name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]


def sse(payload: BaseModel | str) -> str:
    data = payload if isinstance(payload, str) else payload.model_dump_json()
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class ServingBase:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx
        self.token_strings = TokenStrings(ctx.tokenizer)

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.ctx.model_name:
            raise model_not_found(name)

    def check_length(self, prompt: list[int], max_tokens: int, param: str, prompt_param: str) -> None:
        """A prompt that fits with max_tokens more; errors name `param` (the length field) or `prompt_param`
        (the field the prompt came from: prompt, or messages in chat, as OpenAI names them)."""
        limit = self.ctx.max_model_len
        if not prompt:
            raise bad_request("the prompt is empty", prompt_param)
        if len(prompt) >= limit:  # the engine needs room for one more position, scoring alone included
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, the prompt "
                              f"has {len(prompt)} tokens, which leaves no room for a completion.", prompt_param)
        if len(prompt) + max_tokens > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} for the "
                f"completion). Please reduce the prompt or {param}.", param)

    def check_token_ids(self, ids: list[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.ctx.vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {self.ctx.vocab_size})", "prompt")

    def sampling_params(self, req, max_tokens: int, logprobs: Optional[int], index: int,
                        prompt_logprobs: Optional[int] = None) -> SamplingParams:
        """Params for choice `index`: with a seed, choice i draws from seed + i (so n > 1 gives n texts)."""
        bias = []
        for key, value in (req.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise bad_request(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
            self.check_token_ids([token])
            bias.append((token, max(-100.0, min(100.0, float(value)))))
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=max(0, req.top_k),
            seed=None if req.seed is None else (req.seed + index) % (1 << 64),  # torch takes uint64 seeds
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            logit_bias=tuple(bias), stop=req.stop_strings(), stop_token_ids=self.ctx.eos_token_ids,
            ignore_eos=req.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], loop=None) -> RequestStream:
        if len(prompts) > self.ctx.engine.capacity:  # would never fit, however long the client waits
            raise bad_request(f"the request needs {len(prompts)} sequences (prompts x n); this server holds at "
                              f"most {self.ctx.engine.capacity} at once", "n")
        try:
            return RequestStream(self.ctx.engine, prompts, params, loop)
        except QueueFullError as exc:
            raise queue_full(str(exc)) from None


def engine_error(message: Optional[str]) -> APIError:
    return APIError(500, f"generation failed: {message or 'the engine stopped'}")


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)
