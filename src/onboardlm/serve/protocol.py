"""The OpenAI request bodies this server takes, and the response and stream-chunk bodies it sends.

Unknown fields are ignored (clients send more than a server needs); fields whose meaning this server
does not implement (``n > 1``, ``logprobs``, ``echo``, ``best_of``, ``suffix``, penalties, ``logit_bias``)
are refused rather than silently dropped. ``top_k``, ``ignore_eos`` and ``return_token_ids`` (the
answer's token ids on each choice) are extensions, passed by the openai client as ``extra_body``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from onboardlm.runtime.requests import FinishReason, RequestEvent

#: Fields this server does not implement, with the values that mean "not used".
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "logprobs": (None, False, 0),
    "echo": (False,),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    ignore_eos: bool = False
    return_token_ids: bool = False
    logprobs: Any = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator(*_NEUTRAL)
    @classmethod
    def _supported(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in _NEUTRAL[info.field_name]:
            raise ValueError("not supported by this server")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("takes at most 4 non-empty strings")
        return value

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``: one prompt, as text or token ids (a list of one of either is accepted)."""

    prompt: str | list[int] | list[str] | list[list[int]]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``: messages rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(event: RequestEvent) -> str | None:
    """OpenAI's finish reason (``stop``/``length``); a cancelled request reads as ``stop``."""
    if event.finish is None:
        return None
    return "length" if event.finish is FinishReason.LENGTH else "stop"


class ResponseBuilder:
    """Bodies of one completion or chat completion: the whole answer or its stream chunks."""

    def __init__(self, chat: bool, model: str, token_ids: bool) -> None:
        self.chat = chat
        self.model = model
        self.token_ids = token_ids
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _body(self, obj: str, choices: list[dict], **extra: Any) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}  # fmt: skip

    def whole(self, text: str, token_ids: list[int], last: RequestEvent) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(last), "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        if self.token_ids:
            choice["token_ids"] = token_ids
        obj = "chat.completion" if self.chat else "text_completion"
        return self._body(obj, [choice], usage=usage(last.prompt_tokens, last.completion_tokens))

    def chunk(self, event: RequestEvent, first: bool = False) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason(event), "logprobs": None}
        if self.chat:
            choice["delta"] = (
                {"role": "assistant", "content": event.text} if first else {"content": event.text}
            )
        else:
            choice["text"] = event.text
        if self.token_ids:
            choice["token_ids"] = event.token_ids
        return self._body("chat.completion.chunk" if self.chat else "text_completion", [choice])

    def usage_chunk(self, last: RequestEvent) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._body(obj, [], usage=usage(last.prompt_tokens, last.completion_tokens))
