"""The serving engine: continuous batching over a paged model, on one thread that owns the model.

Other threads call :meth:`ServingEngine.submit` and :meth:`ServingEngine.cancel`; both only put a
message in the engine's inbox (``submit`` first checks the request and the queue length, so a refusal
is immediate). The engine thread admits, schedules (:mod:`onboardlm.runtime.scheduler`), runs one model
step, samples each finished chunk's next token with that request's own settings and reports every new
token through the request's ``on_event`` callback, called on the engine thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from onboardlm.registry.settings import SamplingSettings
from onboardlm.runtime.detokenizer import TextStream
from onboardlm.runtime.paged_model import PagedModel
from onboardlm.runtime.requests import FinishReason, GenerationRequest, RequestEvent
from onboardlm.runtime.sampler import sample
from onboardlm.runtime.scheduler import Chunk, QueueFull, Scheduler, SchedulerLimits, Sequence

logger = logging.getLogger(__name__)

EventCallback = Callable[[RequestEvent], None]


class ContextLengthExceeded(ValueError):
    """Prompt plus ``max_tokens`` longer than the model's context (``limit`` tokens)."""

    def __init__(self, limit: int, prompt_tokens: int, max_tokens: int) -> None:
        self.limit = limit
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        super().__init__(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
            "completion). Please reduce the prompt or max_tokens."
        )


class ShuttingDown(Exception):
    """The engine no longer admits requests."""


@dataclass(frozen=True)
class EngineConfig:
    """Cache and batching limits of a :class:`ServingEngine`."""

    max_seq_len: int
    limits: SchedulerLimits
    vocab_size: int


@dataclass
class EngineStats:
    """Counters and gauges the engine thread updates after every step (read by metrics)."""

    waiting: int = 0
    running: int = 0
    blocks_used: int = 0
    blocks_total: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0


@dataclass
class _Active:
    """Engine-thread state of one request beside its scheduler :class:`Sequence`."""

    request: GenerationRequest
    on_event: EventCallback
    stream: TextStream
    settings: SamplingSettings
    generator: torch.Generator | None
    seq: Sequence | None = None
    token_ids: list[int] = field(default_factory=list)


class ServingEngine:
    """Continuous batching over ``model``; call :meth:`start`, then submit requests from any thread."""

    def __init__(
        self,
        model: PagedModel,
        scheduler: Scheduler,
        tokenizer: PreTrainedTokenizerBase,
        stop_ids: Iterable[int],
        config: EngineConfig,
    ) -> None:
        self.model = model
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(stop_ids)
        self.config = config
        self.stats = EngineStats(blocks_total=scheduler.allocator.num_blocks)
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._active: dict[str, _Active] = {}
        self._queued: set[str] = set()  # submitted, not running yet (guarded by _lock)
        self._unfinished: set[str] = set()  # submitted, not finished (guarded by _lock)
        self._lock = threading.Lock()
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._samples: deque[tuple[float, int]] = deque(maxlen=4096)  # (time, generated_tokens) per step
        # Tokens of the last step whose text and events are still to go out (see ``step``):
        # (request, token or None for a stop token, finish reason or None)
        self._pending: list[tuple[_Active, int | None, FinishReason | None]] = []

    # -- any thread --------------------------------------------------------------------------------

    def check(self, request: GenerationRequest) -> None:
        """Raise ValueError (:class:`ContextLengthExceeded` for length) unless ``request`` can run."""
        prompt, max_tokens = len(request.prompt_ids), request.sampling.max_tokens
        if prompt == 0:
            raise ValueError("the prompt has no tokens")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if prompt + max_tokens > self.config.max_seq_len:
            raise ContextLengthExceeded(self.config.max_seq_len, prompt, max_tokens)
        bad = [t for t in request.prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        _sampling_settings(request)  # a pydantic ValidationError is a ValueError

    def submit(self, request: GenerationRequest, on_event: EventCallback) -> None:
        """Queue ``request``; raises :class:`ShuttingDown`, :class:`QueueFull` or ValueError at once."""
        self.check(request)
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if request.request_id in self._unfinished:
                raise ValueError(f"request id {request.request_id!r} is in use")
            if len(self._queued) >= self.scheduler.limits.max_waiting:
                raise QueueFull(f"{len(self._queued)} requests are waiting already")
            self._queued.add(request.request_id)
            self._unfinished.add(request.request_id)
        self._inbox.put(("add", request, on_event))

    def cancel(self, request_id: str) -> None:
        """Cancel a request (its blocks are freed on the engine's next turn); unknown ids are ignored."""
        self._inbox.put(("cancel", request_id))

    @property
    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._unfinished)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Output tokens per second over the last ``window`` seconds of steps (0 when idle)."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._samples) if now - t <= window]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return (self.stats.generated_tokens - recent[0][1]) / span

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="onboardlm-engine", daemon=True)
        self._thread.start()

    def stop_admitting(self) -> None:
        """Refuse new requests (:class:`ShuttingDown`); the admitted ones go on."""
        with self._lock:
            self._accepting = False

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admitting, let running requests finish for up to ``timeout`` seconds, cancel the rest
        and stop the engine thread."""
        self.stop_admitting()
        deadline = time.monotonic() + timeout
        while self.num_unfinished and time.monotonic() < deadline:
            time.sleep(0.02)
        self._inbox.put(("stop",))
        if self._thread is not None:
            self._thread.join()

    # -- engine thread -----------------------------------------------------------------------------

    def run_once(self, block: bool = False) -> bool:
        """Apply the inbox (waiting up to 0.1 s for a message when ``block``), then run one step when
        there is work; False once the engine was told to stop. The engine thread calls it in a loop."""
        if not self._read_inbox(block):
            return False
        if self.scheduler.has_work():
            self.step()
        return True

    def _loop(self) -> None:
        while True:
            try:
                if not self.run_once(block=not self.scheduler.has_work()):
                    break
            except Exception as error:  # a bug must not leave requests waiting for ever
                logger.exception("engine turn failed")
                pending, self._pending = self._pending, []
                for active, token, reason in pending:  # requests already closed: report their end
                    if token is None or reason is not None:
                        self._report_end(active, FinishReason.ERROR, error=str(error))
                for request_id, active in list(self._active.items()):
                    self.scheduler.cancel(request_id)
                    self._finish(active, FinishReason.ERROR, error=str(error))
        self._flush()
        for request_id in list(self._active):
            self._cancel(request_id)

    def _read_inbox(self, block: bool) -> bool:
        """Apply the inbox's messages (waiting for one when ``block``); False on ``stop``."""
        try:
            message = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if message[0] == "stop":
                return False
            if message[0] == "add":
                self._add(message[1], message[2])
            else:
                self._cancel(message[1])
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _add(self, request: GenerationRequest, on_event: EventCallback) -> None:
        sampling = request.sampling
        generator = None if sampling.seed is None else torch.Generator().manual_seed(sampling.seed)
        stream = TextStream(self.tokenizer, sampling.stop)
        active = _Active(request, on_event, stream, _sampling_settings(request), generator)
        self._active[request.request_id] = active
        try:
            self.scheduler.add(request)
        except (QueueFull, ValueError) as error:
            self._finish(active, FinishReason.ERROR, error=str(error))

    def _cancel(self, request_id: str) -> None:
        self._flush()  # its last tokens go out before its end
        active = self._active.get(request_id)
        if active is not None:
            self.scheduler.cancel(request_id)
            self._finish(active, FinishReason.CANCELLED)

    def step(self) -> None:
        """One model step over the scheduled chunks; reports the new tokens.

        The text and events of a step's tokens (for requests without stop strings, whose end does not
        depend on the text) go out while the device computes the next step: the model step is queued
        on the device first, then the previous step's tokens are detokenized and sent, then this step's
        tokens are read (the step's only host synchronisation).
        """
        chunks = self.scheduler.schedule()
        self._note_admitted()
        if chunks:
            try:
                logits = self.model.step(chunks)
            except Exception as error:  # a failed step ends its requests, not the server
                logger.exception("model step failed")
                self._flush()
                for chunk in chunks:
                    self.scheduler.cancel(chunk.seq.request_id)
                    self._finish(self._active[chunk.seq.request_id], FinishReason.ERROR, error=str(error))
            else:
                self._flush()
                self._advance(chunks, logits)
        if not chunks or not self.scheduler.has_work():
            self._flush()
        self._update_stats()

    def _note_admitted(self) -> None:
        admitted = [rid for rid in self.scheduler.running if self._active[rid].seq is None]
        for rid in admitted:
            self._active[rid].seq = self.scheduler.running[rid]
        if admitted:
            with self._lock:
                self._queued.difference_update(admitted)

    def _advance(self, chunks: list[Chunk], logits: torch.Tensor) -> None:
        greedy = logits.argmax(dim=-1).tolist()
        for row, chunk in enumerate(chunks):
            seq = chunk.seq
            seq.num_cached += chunk.length
            if chunk.start < len(seq.request.prompt_ids):
                self.stats.prompt_tokens += min(chunk.length, len(seq.request.prompt_ids) - chunk.start)
            if not chunk.samples:
                continue
            active = self._active[seq.request_id]
            if active.settings.temperature == 0:
                token = greedy[row]
            else:
                token = int(sample(logits[row : row + 1], active.settings, active.generator)[0])
            self._on_token(active, seq, token)

    def _on_token(self, active: _Active, seq: Sequence, token: int) -> None:
        sampling = active.request.sampling
        deferred = not active.stream.stop  # the end does not depend on the text: send it later
        if token in self.stop_ids and not sampling.ignore_eos:
            if deferred:
                self._close(active)
                self._pending.append((active, None, FinishReason.STOP))
            else:
                self._finish(active, FinishReason.STOP, text=active.stream.flush())
            return
        self.stats.generated_tokens += 1
        seq.tokens.append(token)
        active.token_ids.append(token)
        if deferred:
            done = seq.num_output >= sampling.max_tokens
            if done:
                self._close(active)
            self._pending.append((active, token, FinishReason.LENGTH if done else None))
            return
        text, stopped = active.stream.push(token)
        if stopped:
            self._finish(active, FinishReason.STOP, text, [token])
        elif seq.num_output >= sampling.max_tokens:
            self._finish(active, FinishReason.LENGTH, text + active.stream.flush(), [token])
        else:
            self._send(active, RequestEvent(seq.request_id, text, [token]))

    def _flush(self) -> None:
        """Detokenize and send the tokens of the last step that are still pending."""
        pending, self._pending = self._pending, []
        for active, token, reason in pending:
            if token is None:  # a stop token
                self._report_end(active, FinishReason.STOP, active.stream.flush())
                continue
            text, _ = active.stream.push(token)
            if reason is None:
                self._send(active, RequestEvent(active.request.request_id, text, [token]))
            else:
                self._report_end(active, reason, text + active.stream.flush(), [token])

    def _close(self, active: _Active) -> None:
        """Free a finished request's blocks and forget it (its end is reported by ``_report_end``)."""
        request_id = active.request.request_id
        if active.seq is not None and request_id in self.scheduler.running:
            self.scheduler.finish(active.seq)
        self._active.pop(request_id, None)

    def _finish(
        self,
        active: _Active,
        reason: FinishReason,
        text: str = "",
        token_ids: list[int] | None = None,
        error: str | None = None,
    ) -> None:
        self._close(active)
        self._report_end(active, reason, text, token_ids, error)

    def _report_end(
        self,
        active: _Active,
        reason: FinishReason,
        text: str = "",
        token_ids: list[int] | None = None,
        error: str | None = None,
    ) -> None:
        request_id = active.request.request_id
        with self._lock:
            self._queued.discard(request_id)
            self._unfinished.discard(request_id)
        event = RequestEvent(
            request_id,
            text,
            token_ids or [],
            reason,
            len(active.request.prompt_ids),
            len(active.token_ids),
            error,
        )
        self._send(active, event)

    def _send(self, active: _Active, event: RequestEvent) -> None:
        try:
            active.on_event(event)
        except Exception:  # a listener that is gone (closed event loop) must not stop the engine
            logger.debug("event for %s not delivered", event.request_id, exc_info=True)

    def _update_stats(self) -> None:
        stats = self.stats
        stats.waiting = len(self.scheduler.waiting)
        stats.running = len(self.scheduler.running)
        stats.blocks_used = self.scheduler.allocator.num_used
        stats.steps += 1
        self._samples.append((time.monotonic(), stats.generated_tokens))


def _sampling_settings(request: GenerationRequest) -> SamplingSettings:
    sampling = request.sampling
    return SamplingSettings(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
