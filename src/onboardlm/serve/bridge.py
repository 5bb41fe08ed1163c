"""The asyncio side of the engine: submit a request, receive its events as an async iterator.

The engine thread hands each event to the request's event loop (``call_soon_threadsafe``); a consumer
that stops early (a client that went away) cancels the request, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from onboardlm.runtime.requests import FinishReason, GenerationRequest, RequestEvent
from onboardlm.runtime.serving import ServingEngine
from onboardlm.serve.metrics import ServeMetrics


class AsyncEngine:
    """:class:`ServingEngine` for coroutines, observing TTFT and TPOT of every request."""

    def __init__(self, engine: ServingEngine, metrics: ServeMetrics) -> None:
        self.engine = engine
        self.metrics = metrics

    def submit(self, request: GenerationRequest) -> AsyncIterator[RequestEvent]:
        """Submit now (refusals raise here, before any response starts); iterate the result for events."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[RequestEvent] = asyncio.Queue()
        arrived = time.perf_counter()
        self.engine.submit(request, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        return self._events(request.request_id, events, arrived)

    async def _events(
        self, request_id: str, events: asyncio.Queue[RequestEvent], arrived: float
    ) -> AsyncIterator[RequestEvent]:
        first: float | None = None
        finished = False
        try:
            while True:
                event = await events.get()
                now = time.perf_counter()
                if first is None and (event.token_ids or event.finish):
                    first = now
                    self.metrics.ttft.observe(now - arrived)
                if event.finish is not None:
                    finished = True
                    if event.completion_tokens > 1:
                        self.metrics.tpot.observe((now - first) / (event.completion_tokens - 1))
                    self.metrics.requests.labels(event.finish.value).inc()
                yield event
                if finished:
                    return
        finally:
            if not finished:  # the consumer left: its request is cancelled
                self.engine.cancel(request_id)
                self.metrics.requests.labels(FinishReason.CANCELLED.value).inc()
