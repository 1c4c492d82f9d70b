"""The OpenAI API's request bodies (what xiaolm honours of them), its error body, and the responses.

Requests are validated strictly (a string where a number belongs is an error, not converted).
Fields the API defines but xiaolm does not implement (n > 1, logprobs, tools, ...) are refused
with a 400 that names them, never ignored in silence. Two extensions, as vLLM accepts them:
`top_k` and `repetition_penalty`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 4  # as the OpenAI API allows


class ApiError(Exception):
    """An error for the client: HTTP status and the OpenAI error body's fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """{"error": {"message", "type", "param", "code"}}: what the OpenAI API returns on any error."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Body(BaseModel):
    # unknown fields are ignored, as most OpenAI-compatible servers do; known ones are strict
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool | None = Field(None, description="Send a last chunk with token usage.")


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class _SamplingFields(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy. Default 1.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling. Default 1.")
    n: int | None = Field(None, ge=1, description="Only 1 is supported.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP_STRINGS} stop strings.")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="Same seed + same request = same text.")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    top_k: int | None = Field(None, ge=0, description="Extension: sample among the k likeliest tokens; 0 = all.")
    repetition_penalty: float | None = Field(None, ge=0.01, le=10, description="Extension: CTRL's penalty; 1 = off.")


class ChatCompletionRequest(_SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (newer name).")
    logprobs: bool | None = Field(None, description="Not supported: true is refused.")
    top_logprobs: int | None = Field(None, description="Not supported.")
    tools: list[Any] | None = Field(None, description="Not supported.")
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'}.")


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, description="Not supported.")
    echo: bool | None = Field(None, description="Not supported: true is refused.")
    suffix: str | None = Field(None, description="Not supported.")
    best_of: int | None = Field(None, description="Only 1 is supported.")


def refuse_unsupported(body: _SamplingFields) -> None:
    """400 for every OpenAI feature asked for that xiaolm does not implement."""
    refused = {
        "n": body.n not in (None, 1),
        "logprobs": getattr(body, "logprobs", None) not in (None, False),
        "top_logprobs": getattr(body, "top_logprobs", None) is not None,
        "tools": bool(getattr(body, "tools", None)),
        "response_format": getattr(body, "response_format", None) not in (None, {"type": "text"}),
        "echo": bool(getattr(body, "echo", None)),
        "suffix": getattr(body, "suffix", None) is not None,
        "best_of": getattr(body, "best_of", None) not in (None, 1),
    }
    for param, is_refused in refused.items():
        if is_refused:
            raise ApiError(400, f"'{param}' is not supported by this server (xiaolm); leave it out", param,
                           "unsupported_parameter")


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    return tuple(s for s in stops if s)


def message_text(message: Message, index: int) -> str:
    """A message's content as text: a string, or text parts joined (other parts are refused)."""
    if message.content is None:
        raise ApiError(400, f"messages[{index}] has no content", f"messages[{index}].content")
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"messages[{index}]: content parts of type {part.type!r} are not supported "
                           "(text only)", f"messages[{index}].content")
        texts.append(part.text)
    return "".join(texts)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(num_prompt: int, num_completion: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}
