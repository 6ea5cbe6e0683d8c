"""POST /v1/completions: prompts -> engine sequences -> a CompletionResponse or an SSE stream."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from .async_engine import RequestStream
from .errors import bad_request
from .protocol import (CompletionChoice, CompletionLogProbs, CompletionRequest, CompletionResponse, new_id,
                       now)
from .serving_common import SSE_DONE, ServingBase, engine_error, sse, usage


@dataclass
class _LogprobsBuilder:
    """Completions-style logprobs, one entry per token, offsets into the returned text."""
    token_strings: object
    out: CompletionLogProbs = field(default_factory=CompletionLogProbs)
    offset: int = 0

    def add(self, token_id: int, logprob: Optional[float], top: tuple = ()) -> None:
        text = self.token_strings.get(token_id)
        self.out.tokens.append(text)
        self.out.token_logprobs.append(logprob)
        self.out.text_offset.append(self.offset)
        self.offset += len(text)
        if logprob is None:
            self.out.top_logprobs.append(None)
            return
        best = {text: logprob}
        for tid, lp in top:
            best.setdefault(self.token_strings.get(tid), lp)
        self.out.top_logprobs.append(best)

    def add_prompt(self, prompt: list[int], entries: list) -> None:
        for token_id, entry in zip(prompt, entries):
            self.add(token_id, *(entry if entry else (None,)))

    def take(self) -> CompletionLogProbs:
        out, self.out = self.out, CompletionLogProbs()
        return out


@dataclass
class _Job:
    stream: RequestStream
    request: CompletionRequest
    prompts: list[list[int]]
    prompt_texts: list[str]
    id: str = field(default_factory=lambda: new_id("cmpl"))
    created: int = field(default_factory=now)
    counts: list[int] = field(default_factory=list)  # generated tokens per sequence
    logprobs: list[_LogprobsBuilder] = field(default_factory=list)

    def prompt_of(self, index: int) -> int:
        return index // self.request.n

    def record(self, i: int, out) -> None:
        """Counts sequence i's new token and appends its (and, first time, its prompt's) logprobs."""
        if out.prompt_logprobs is not None:
            self.logprobs[i].add_prompt(self.prompts[self.prompt_of(i)], out.prompt_logprobs)
        if out.token is not None:
            self.counts[i] += 1
            if self.request.logprobs is not None:
                self.logprobs[i].add(out.token.token_id, out.token.logprob, out.token.top_logprobs)

    def take_logprobs(self, i: int) -> Optional[CompletionLogProbs]:
        return self.logprobs[i].take() if self.request.logprobs is not None else None

    def usage(self):
        return usage(sum(map(len, self.prompts)), sum(self.counts))


class CompletionService(ServingBase):
    def _tokenize(self, prompt) -> tuple[list[list[int]], list[str]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise bad_request("the prompt is empty", "prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        if isinstance(prompt[0], str):
            ids = [self.ctx.tokenizer(p).input_ids for p in prompt]
            return ids, list(prompt)
        for p in prompt:
            self.check_token_ids(p)
        return [list(p) for p in prompt], [self.ctx.tokenizer.decode(p) for p in prompt]

    def start(self, req: CompletionRequest, loop=None) -> _Job:
        """Validates and queues every sequence (raises APIError: 400, 404, 429). loop: the event loop that will
        read the outputs, when called from a worker thread (the routes tokenize off the event loop)."""
        self.check_model(req.model)
        prompts, texts = self._tokenize(req.prompt)
        limits = [self.ctx.max_model_len - len(p) if req.max_tokens is None else req.max_tokens
                  for p in prompts]  # null: up to the context
        for p, limit in zip(prompts, limits):
            self.check_length(p, limit, "max_tokens", "prompt")
        prompt_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
        params = [self.sampling_params(req, limit, req.logprobs, j, prompt_lp)
                  for limit in limits for j in range(req.n)]
        seq_prompts = [p for p in prompts for _ in range(req.n)]
        return _Job(self.submit(seq_prompts, params, loop), req, prompts, texts, counts=[0] * len(seq_prompts),
                    logprobs=[_LogprobsBuilder(self.token_strings) for _ in seq_prompts])

    async def respond(self, job: _Job) -> CompletionResponse:
        req, k = job.request, len(job.prompts) * job.request.n
        texts = [job.prompt_texts[job.prompt_of(i)] if req.echo else "" for i in range(k)]
        finish: list[Optional[str]] = [None] * k
        try:
            async for i, out in job.stream:
                if out.finish_reason in ("error", "abort"):
                    raise engine_error(out.error)
                job.record(i, out)
                texts[i] += out.text
                finish[i] = out.finish_reason or finish[i]
        finally:
            job.stream.abort()
        choices = [CompletionChoice(index=i, text=texts[i], finish_reason=finish[i], logprobs=job.take_logprobs(i))
                   for i in range(k)]
        return CompletionResponse(id=job.id, created=job.created, model=self.ctx.model_name, choices=choices,
                                  usage=job.usage())

    async def stream(self, job: _Job) -> AsyncIterator[str]:
        req, k = job.request, len(job.prompts) * job.request.n
        started = [False] * k
        try:
            async for i, out in job.stream:
                if out.finish_reason in ("error", "abort"):
                    yield sse(engine_error(out.error).body())
                    break
                text = out.text
                if req.echo and not started[i]:
                    text = job.prompt_texts[job.prompt_of(i)] + text
                started[i] = True
                job.record(i, out)
                if not text and out.finish_reason is None and req.logprobs is None:
                    continue
                choice = CompletionChoice(index=i, text=text, finish_reason=out.finish_reason,
                                          logprobs=job.take_logprobs(i))
                yield sse(CompletionResponse(id=job.id, created=job.created, model=self.ctx.model_name,
                                             choices=[choice]))
            else:
                if req.stream_options and req.stream_options.include_usage:
                    yield sse(CompletionResponse(id=job.id, created=job.created, model=self.ctx.model_name,
                                                 choices=[], usage=job.usage()))
            yield SSE_DONE
        finally:
            job.stream.abort()
