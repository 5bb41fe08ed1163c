"""What a serving request asks for and what the engine sends back, as plain dataclasses."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RequestSampling:
    """Per-request sampling: ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` keep all."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt (token ids) to continue, with its sampling settings."""

    request_id: str
    prompt_ids: list[int]
    sampling: RequestSampling


class FinishReason(str, enum.Enum):
    """Why a request ended, in OpenAI's words where OpenAI has one."""

    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # the client went away or the server shut down
    ERROR = "error"  # the engine failed


@dataclass
class RequestEvent:
    """New output of one request: ``text`` and ``token_ids`` produced since the last event;
    ``finish`` set on the last event of the request."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
