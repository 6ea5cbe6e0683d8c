"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the matching HTTP status."""
from __future__ import annotations

from typing import Optional

from fastapi.responses import JSONResponse

from .protocol import ErrorInfo, ErrorResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> ErrorResponse:
        default = "invalid_request_error" if self.status < 500 else "server_error"
        return ErrorResponse(error=ErrorInfo(message=self.message, type=_TYPES.get(self.status, default),
                                             param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        # Messages may quote client input: anything that is not valid Unicode (a lone surrogate) is escaped so
        # that the error itself can always be encoded.
        body = {k: v.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(v, str) else v
                for k, v in self.body().model_dump()["error"].items()}
        return JSONResponse({"error": body}, status_code=self.status, headers=self.headers)


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body larger than {limit} bytes (the server's --max-request-bytes)")


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param, "invalid_value" if param else None)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist.", "model", "model_not_found")


def unauthorized() -> APIError:
    return APIError(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                     None, "invalid_api_key")


def queue_full(message: str) -> APIError:
    return APIError(429, message, None, "queue_full", headers={"Retry-After": "1"})


def _field_path(loc) -> str:
    """('body', 'messages', 0, 'role') -> 'messages.0.role'; stops at a union member tag such as 'list[int]'."""
    parts = []
    for p in loc:
        if p == "body" and not parts:
            continue
        if isinstance(p, str) and (not p.isidentifier() or p in {"str", "int", "float", "bool"} or p[:1].isupper()):
            break
        parts.append(str(p))
    return ".".join(parts)


def validation_error(errors: list[dict]) -> APIError:
    """FastAPI's RequestValidationError details -> one 400 naming the first offending field."""
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
    param = _field_path(first.get("loc", ()))
    messages = [_message(e) for e in errors if _field_path(e.get("loc", ())) == param]
    message = "; or ".join(dict.fromkeys(messages))  # a union field reports one message per accepted type
    if not param:  # a whole-request check names its field itself: "suffix: ..."
        head = message.split(":", 1)[0]
        return bad_request(message, head if head.isidentifier() else None)
    return bad_request(f"{param}: {message}", param)


def _message(error: dict) -> str:
    if error.get("type") == "extra_forbidden":
        return "not supported by this server"
    return error.get("msg", "invalid value").removeprefix("Value error, ")
