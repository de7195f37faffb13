"""Request bodies of the OpenAI-compatible API (and lrpt's ``/v1/classify``), and error bodies.

Pydantic checks types and ranges; what it rejects becomes an OpenAI-style 400
(``{"error": {"message", "type", "param", "code"}}``), so the official client raises
``BadRequestError`` with a readable message. Options lrpt does not implement (logprobs, echo,
best_of, penalties, tools...) are refused rather than silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import ServeError

UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "logit_bias", "tools", "functions",
               "response_format", "presence_penalty", "frequency_penalty")


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = Field(default=None, ge=0, lt=2**63)  # both backends take it; choice j uses seed + j
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in (None, False, 0, 0.0, {}, []):
                raise ServeError(f"{name} is not supported by lrpt serve", param=name, code="unsupported_parameter")
        return self

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: the prompt is used raw (as ``lrpt generate --raw``)."""

    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompt must be a non-empty string or a non-empty list of them")
        return prompts


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ServeError("only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``: the messages go through the tokenizer's chat template."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class ClassifyRequest(BaseModel):
    """``POST /v1/classify``: label scores of the adapter's task for each input."""

    model: str = Field(min_length=1)
    input: str | list[str]

    @field_validator("input")
    @classmethod
    def _inputs(cls, v):
        inputs = [v] if isinstance(v, str) else v
        if not inputs or any(not x for x in inputs):
            raise ValueError("input must be a non-empty string or a non-empty list of them")
        return inputs


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_validation(errors: list[dict[str, Any]]) -> ServeError:
    """The first pydantic error as one readable line, naming the parameter."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    param = loc[0] if loc else None
    where = ".".join(loc)
    return ServeError(f"{where}: {msg}" if where else msg, param=param, code="invalid_value")
