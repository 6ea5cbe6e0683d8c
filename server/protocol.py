"""OpenAI wire format: requests (validated; bad values become 400s) and responses, in the API docs' order."""
from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

MAX_LOGPROBS = 20


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def _unencodable(value) -> str | None:
    """The path of the first string (or key) in a parsed JSON value that is not valid Unicode text (a lone
    UTF-16 surrogate such as "\\ud800", which JSON's escapes allow but no tokenizer or encoder accepts).
    Iterative: a deeply nested body cannot exhaust the stack."""
    stack = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(item, dict):
            for key, sub in reversed(list(item.items())):
                sub_path = f"{path}.{key}" if path else str(key)
                stack.append((sub_path, sub))
                stack.append((sub_path, key))
        elif isinstance(item, list):
            stack.extend((f"{path}.{i}", sub) for i, sub in reversed(list(enumerate(item))))
    return None


class _Request(BaseModel):
    # Every field either works or is refused: an unknown one is a 400 ("not supported by this server"), never
    # accepted and ignored. Integer fields are declared strict (no booleans or strings in them).
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        bad = _unencodable(data)
        if bad is not None:
            safe = bad.encode("utf-8", "backslashreplace").decode("utf-8")
            raise ValueError(f"{safe}: contains a lone UTF-16 surrogate, which is not valid Unicode text")
        return data


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    """Fields shared by both endpoints."""
    model: Optional[str] = None
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]]] = None
    n: int = Field(1, ge=1, le=128, strict=True)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: Optional[int] = Field(None, strict=True)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's range
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: Optional[str] = None  # an end-user id for the caller's own records; it changes no output
    # Extensions shared with vLLM.
    top_k: int = Field(-1, ge=-1, strict=True)
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[Annotated[int, Field(strict=True)]], list[list[Annotated[int, Field(strict=True)]]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, strict=True)
    max_tokens: Optional[int] = Field(16, ge=0, strict=True)  # 0 only with echo: score the prompt, generate nothing
    suffix: Optional[str] = None  # insertion is not supported: only None or ""
    best_of: Optional[int] = Field(None, strict=True)  # only None or 1 (no server-side best-of sampling)

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        if self.suffix:
            raise ValueError("suffix: insertion (a suffix after the completion) is not supported by this server")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: only 1 is supported by this server (ask for n completions instead)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 generates nothing, so it needs echo (to score the prompt); else >= 1")
        return self


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None
    # What clients echo back from an earlier assistant turn: accepted empty only (no tool calling here).
    tool_calls: Optional[list[Any]] = Field(None, max_length=0)
    refusal: Optional[str] = None

    @field_validator("role", mode="before")
    @classmethod
    def _no_tool_role(cls, role):
        if role == "tool":
            raise ValueError("tool calling is not supported by this server, so tool results cannot be given back")
        return role

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, strict=True)
    max_tokens: Optional[int] = Field(None, ge=1, strict=True)            # deprecated by OpenAI, still sent
    max_completion_tokens: Optional[int] = Field(None, ge=1, strict=True)
    # Accepted only in the forms that ask for nothing this server cannot do (plain text, no tools).
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise ValueError("response_format: only {\"type\": \"text\"} is supported by this server (structured "
                             "outputs, json_object and json_schema, are not)")
        if self.tools:
            raise ValueError("tools: tool calling is not supported by this server")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice: tool calling is not supported by this server (only 'none' or 'auto' "
                             "without tools)")
        return self


# ---- responses ------------------------------------------------------------------------------------

class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler):  # the closing delta is {} on the wire, as OpenAI sends it
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "mamp"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
