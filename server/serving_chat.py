"""POST /v1/chat/completions: messages -> chat template -> engine sequences -> response or SSE stream."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from .async_engine import RequestStream
from .errors import bad_request
from .protocol import (AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatMessage, ChatStreamChoice, ChoiceLogprobs, DeltaMessage,
                       TokenLogprob, TopLogprob, new_id, now)
from .sampling import SampledToken
from .serving_common import SSE_DONE, ServingBase, engine_error, sse, usage


def fallback_prompt(messages: list[ChatMessage]) -> str:
    """For tokenizers without a chat template: 'role: content' lines, then the assistant's turn."""
    lines = [f"{m.role}{f' ({m.name})' if m.name else ''}: {m.text()}" for m in messages]
    return "\n".join(lines + ["assistant:"])


@dataclass
class _Job:
    stream: RequestStream
    request: ChatCompletionRequest
    prompt: list[int]
    id: str = field(default_factory=lambda: new_id("chatcmpl"))
    created: int = field(default_factory=now)


class ChatService(ServingBase):
    def _prompt_ids(self, req: ChatCompletionRequest) -> list[int]:
        tok = self.ctx.tokenizer
        if getattr(tok, "chat_template", None):
            # `name` goes to the template as OpenAI sends it; templates that know it use it, others ignore it
            messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                        for m in req.messages]
            try:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # jinja templates raise on e.g. roles they do not allow
                raise bad_request(f"the chat template rejected the messages: {exc}", "messages") from None
            return tok(text, add_special_tokens=False).input_ids
        return tok(fallback_prompt(req.messages)).input_ids

    def start(self, req: ChatCompletionRequest, loop=None) -> _Job:
        """Validates and queues the n sequences (raises APIError: 400, 404, 429). loop: the event loop that will
        read the outputs, when called from a worker thread (the routes tokenize off the event loop)."""
        self.check_model(req.model)
        prompt = self._prompt_ids(req)
        limit = req.max_completion_tokens or req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        if limit is None:
            self.check_length(prompt, 1, "messages", "messages")
            limit = self.ctx.max_model_len - len(prompt)
        self.check_length(prompt, limit, param, "messages")
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = [self.sampling_params(req, limit, k, j) for j in range(req.n)]
        return _Job(self.submit([prompt] * req.n, params, loop), req, prompt)

    def _logprobs(self, token: Optional[SampledToken]) -> Optional[list[TokenLogprob]]:
        if token is None or token.logprob is None:
            return None
        text = self.token_strings.get(token.token_id)
        top = [TopLogprob(token=(s := self.token_strings.get(t)), logprob=lp, bytes=list(s.encode()))
               for t, lp in token.top_logprobs]
        return [TokenLogprob(token=text, logprob=token.logprob, bytes=list(text.encode()), top_logprobs=top)]

    async def respond(self, job: _Job) -> ChatCompletionResponse:
        req = job.request
        texts, finish, counts = [""] * req.n, [None] * req.n, [0] * req.n
        lps: list[list[TokenLogprob]] = [[] for _ in range(req.n)]
        try:
            async for i, out in job.stream:
                if out.finish_reason in ("error", "abort"):
                    raise engine_error(out.error)
                counts[i] += out.token is not None
                lps[i] += self._logprobs(out.token) or []
                texts[i] += out.text
                finish[i] = out.finish_reason or finish[i]
        finally:
            job.stream.abort()
        choices = [ChatChoice(index=i, message=AssistantMessage(content=texts[i]), finish_reason=finish[i],
                              logprobs=ChoiceLogprobs(content=lps[i]) if req.logprobs else None)
                   for i in range(req.n)]
        return ChatCompletionResponse(id=job.id, created=job.created, model=self.ctx.model_name,
                                      choices=choices, usage=usage(len(job.prompt), sum(counts)))

    def _chunk(self, job: _Job, choices: list[ChatStreamChoice], **extra) -> str:
        return sse(ChatCompletionChunk(id=job.id, created=job.created, model=self.ctx.model_name,
                                       choices=choices, **extra))

    async def stream(self, job: _Job) -> AsyncIterator[str]:
        req = job.request
        counts = [0] * req.n
        try:
            for i in range(req.n):  # OpenAI opens every choice with the role and an empty content
                yield self._chunk(job, [ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            async for i, out in job.stream:
                if out.finish_reason in ("error", "abort"):
                    yield sse(engine_error(out.error).body())
                    break
                counts[i] += out.token is not None
                content = self._logprobs(out.token) if req.logprobs else None
                if not out.text and out.finish_reason is None and content is None:
                    continue
                delta = DeltaMessage(content=out.text) if out.text else DeltaMessage()
                logprobs = ChoiceLogprobs(content=content) if content is not None else None
                yield self._chunk(job, [ChatStreamChoice(index=i, delta=delta, logprobs=logprobs,
                                                         finish_reason=out.finish_reason)])
            else:
                if req.stream_options and req.stream_options.include_usage:
                    yield self._chunk(job, [], usage=usage(len(job.prompt), sum(counts)))
            yield SSE_DONE
        finally:
            job.stream.abort()
