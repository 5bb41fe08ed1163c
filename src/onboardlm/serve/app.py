"""The FastAPI app: OpenAI's ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (whole
answers or server-sent events), ``/health`` and ``/metrics``.

Every generation request becomes one engine request; a refusal (bad parameters, unknown model, context
length, full queue, shutdown) is answered in OpenAI's error shape before any generation starts. A client
that disconnects cancels its request, streaming or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from transformers import PreTrainedTokenizerBase

from onboardlm.registry.settings import RunSettings, SamplingSettings
from onboardlm.runtime.requests import FinishReason, GenerationRequest, RequestEvent, RequestSampling
from onboardlm.runtime.scheduler import QueueFull
from onboardlm.runtime.serving import ContextLengthExceeded, ServingEngine, ShuttingDown
from onboardlm.serve.bridge import AsyncEngine
from onboardlm.serve.errors import APIError, install_error_handlers, invalid
from onboardlm.serve.metrics import ServeMetrics
from onboardlm.serve.protocol import ChatCompletionRequest, CompletionRequest, ResponseBuilder, new_id


@dataclass(frozen=True)
class ServedModel:
    """What the app serves: the engine, its model's name and tokenizer, and the request defaults."""

    name: str
    engine: ServingEngine
    sampling: SamplingSettings
    max_tokens: int

    @classmethod
    def from_settings(cls, name: str, engine: ServingEngine, settings: RunSettings) -> ServedModel:
        """Request defaults from the run settings: their sampling and ``max_new_tokens``."""
        return cls(name, engine, settings.sampling, settings.max_new_tokens)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer


def create_app(served: ServedModel) -> FastAPI:
    """The app over ``served.engine`` (started and stopped by its owner, not by the app)."""
    app = FastAPI(title="onboardlm", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    metrics = ServeMetrics(served.engine)
    engine = AsyncEngine(served.engine, metrics)
    app.state.draining = False
    app.state.metrics = metrics

    @app.get("/health")
    async def health() -> JSONResponse:
        if app.state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": served.name, "object": "model", "created": 0, "owned_by": "onboardlm",
            "max_model_len": served.engine.config.max_seq_len,
        }  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check_model(served, body.model)
        prompt = _completion_prompt(served.tokenizer, body.prompt)
        return await _generate(engine, served, body, prompt, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        _check_model(served, body.model)
        if not served.tokenizer.chat_template:
            raise invalid("This model has no chat template; use /v1/completions.", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = served.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as error:  # the template refuses the conversation (roles, order)
            raise invalid(f"The chat template refused the messages: {error}", "messages") from None
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        return await _generate(engine, served, body, list(ids), request, chat=True)

    return app


def _check_model(served: ServedModel, model: str) -> None:
    if model != served.name:
        raise APIError(
            404, f"The model `{model}` does not exist.", "not_found_error", "model", "model_not_found"
        )


def _completion_prompt(tokenizer: PreTrainedTokenizerBase, prompt: object) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise invalid("This server takes one prompt per request.", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    return list(prompt)  # token ids; the engine checks them against the vocabulary


def _engine_request(served: ServedModel, body, prompt: list[int]) -> GenerationRequest:
    if not prompt:
        raise invalid("The prompt is empty.", "prompt")
    defaults = served.sampling
    max_tokens = body.max_tokens
    if max_tokens is None:  # the run settings' max_new_tokens, within what the context leaves
        max_tokens = max(1, min(served.max_tokens, served.engine.config.max_seq_len - len(prompt)))
    top_k = defaults.top_k if body.top_k is None else max(body.top_k, 0)
    sampling = RequestSampling(
        max_tokens=max_tokens,
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        top_k=top_k,
        seed=defaults.seed if body.seed is None else body.seed,
        stop=body.stops,
        ignore_eos=body.ignore_eos,
    )
    return GenerationRequest(new_id("req"), prompt, sampling)


def _submit(engine: AsyncEngine, request: GenerationRequest, chat: bool) -> AsyncIterator[RequestEvent]:
    try:
        return engine.submit(request)
    except ContextLengthExceeded as error:
        raise invalid(str(error), "messages" if chat else "prompt", "context_length_exceeded") from None
    except QueueFull:
        raise APIError(503, "The server is overloaded: the request queue is full.", "server_error", None, "queue_full") from None  # fmt: skip
    except ShuttingDown:
        raise APIError(503, "The server is shutting down.", "server_error", None, "shutting_down") from None
    except ValueError as error:
        raise invalid(str(error), "prompt") from None


async def _generate(
    engine: AsyncEngine, served: ServedModel, body, prompt, request: Request, chat: bool
) -> Response:
    events = _submit(engine, _engine_request(served, body, prompt), chat)
    builder = ResponseBuilder(chat, served.name, body.return_token_ids)
    if body.stream:
        return StreamingResponse(_sse(events, builder, body.include_usage), media_type="text/event-stream")
    collect = asyncio.ensure_future(_collect(events))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():  # the client left: cancelling the collector cancels the request
            collect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collect
    if collect.cancelled():
        return Response(status_code=499)
    text, token_ids, last = collect.result()
    if last.finish is FinishReason.ERROR:
        raise APIError(500, f"The engine failed on this request: {last.error}", "server_error")
    return JSONResponse(builder.whole(text, token_ids, last))


async def _collect(events: AsyncIterator[RequestEvent]) -> tuple[str, list[int], RequestEvent]:
    texts: list[str] = []
    token_ids: list[int] = []
    async with contextlib.aclosing(events):
        async for event in events:
            texts.append(event.text)
            token_ids += event.token_ids
    return "".join(texts), token_ids, event


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse_line(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


async def _sse(events: AsyncIterator[RequestEvent], builder: ResponseBuilder, include_usage: bool):
    first = True
    async with contextlib.aclosing(events):
        async for event in events:
            if event.finish is FinishReason.ERROR:
                yield _sse_line(APIError(500, f"The engine failed on this request: {event.error}", "server_error").body())  # fmt: skip
                break
            yield _sse_line(builder.chunk(event, first))
            first = False
            if event.finish is not None and include_usage:
                yield _sse_line(builder.usage_chunk(event))
    yield "data: [DONE]\n\n"


__all__ = ["ServedModel", "create_app"]
