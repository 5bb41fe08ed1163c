"""Continuous batching: which tokens of which sequences the next model step computes.

Requests wait in a FIFO queue and are admitted, in order, when a running slot is free and the KV blocks
for their prompt plus ``max_tokens`` can be had (reserved up front, so a running sequence never runs
out of cache and is never preempted); they leave as soon as they finish or are cancelled, and their
blocks go back to the free list at once. Every step first gives each decoding sequence its one new
token, then spends what is left of the step's token budget on prompt chunks (chunked prefill), so a
long prompt never holds up the decoding sequences for more than one budget's worth of work.
A model with state layers (SSM, conv, delta rule) also needs a free state slot per running sequence
(:class:`~onboardlm.runtime.paged_cache.StateSlots`): admission takes one, the end of the sequence
gives it back.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from onboardlm.runtime.paged_cache import BlockAllocator, StateSlots, blocks_for
from onboardlm.runtime.requests import GenerationRequest


class QueueFull(Exception):
    """The waiting queue holds ``max_waiting`` requests already."""


@dataclass
class Sequence:
    """A running request: its tokens (prompt, then output), its blocks, its state slot (-1: the model
    keeps no state) and how much is cached."""

    request: GenerationRequest
    blocks: list[int]
    tokens: list[int] = field(default_factory=list)
    num_cached: int = 0
    state_slot: int = -1

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.request.prompt_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_output(self) -> int:
        return len(self.tokens) - len(self.request.prompt_ids)


@dataclass(frozen=True)
class Chunk:
    """Tokens ``start .. start + length - 1`` of ``seq`` to compute in this step."""

    seq: Sequence
    start: int
    length: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so the step samples its next one."""
        return self.start + self.length == len(self.seq.tokens)


@dataclass(frozen=True)
class SchedulerLimits:
    """``max_running`` sequences at once, ``max_step_tokens`` tokens per step, ``max_waiting`` queued."""

    max_running: int
    max_step_tokens: int
    max_waiting: int

    def __post_init__(self) -> None:
        if min(self.max_running, self.max_step_tokens) < 1 or self.max_waiting < 0:
            raise ValueError(f"scheduler limits must be positive: {self}")
        if self.max_step_tokens < self.max_running:
            raise ValueError(
                f"max_step_tokens ({self.max_step_tokens}) must hold one token of each of the "
                f"{self.max_running} running sequences"
            )


class Scheduler:
    """Waiting queue, running sequences, the block allocator and the state slots, if the model keeps
    state (used by one thread only)."""

    def __init__(
        self, allocator: BlockAllocator, limits: SchedulerLimits, state_slots: StateSlots | None = None
    ) -> None:
        self.allocator = allocator
        self.limits = limits
        self.state_slots = state_slots
        self.waiting: deque[GenerationRequest] = deque()
        self.running: dict[str, Sequence] = {}

    def blocks_needed(self, request: GenerationRequest) -> int:
        return blocks_for(len(request.prompt_ids) + request.sampling.max_tokens, self.allocator.block_size)

    def add(self, request: GenerationRequest) -> None:
        """Queue ``request``; :class:`QueueFull` when the queue is full, ValueError when it can never fit."""
        if self.blocks_needed(request) > self.allocator.num_blocks:
            raise ValueError(
                f"request {request.request_id} needs {self.blocks_needed(request)} KV blocks, "
                f"the cache has {self.allocator.num_blocks}"
            )
        if len(self.waiting) >= self.limits.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are waiting already")
        self.waiting.append(request)

    def cancel(self, request_id: str) -> bool:
        """Drop a waiting or running request (its blocks freed at once); False when it is unknown."""
        if request_id in self.running:
            self.finish(self.running[request_id])
            return True
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                return True
        return False

    def finish(self, seq: Sequence) -> None:
        """Remove a running sequence and free its blocks."""
        del self.running[seq.request_id]
        self.allocator.free(seq.blocks)
        seq.blocks = []
        if self.state_slots is not None and seq.state_slot >= 0:
            self.state_slots.free(seq.state_slot)
            seq.state_slot = -1

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.limits.max_running:
            request = self.waiting[0]
            needed = self.blocks_needed(request)
            if not self.allocator.can_allocate(needed):
                return  # FIFO: later requests wait behind the head of the queue
            if self.state_slots is not None and not self.state_slots.num_free:
                return
            self.waiting.popleft()
            slot = -1 if self.state_slots is None else self.state_slots.allocate()
            self.running[request.request_id] = Sequence(
                request, self.allocator.allocate(needed), state_slot=slot
            )

    def schedule(self) -> list[Chunk]:
        """Admit what fits, then the chunks of the next step: every decode, then prompt chunks."""
        self._admit()
        budget = self.limits.max_step_tokens
        chunks: list[Chunk] = []
        prefilling = []
        for seq in self.running.values():
            if len(seq.tokens) - seq.num_cached == 1:
                chunks.append(Chunk(seq, seq.num_cached, 1))
                budget -= 1
            else:
                prefilling.append(seq)
        for seq in prefilling:
            if budget <= 0:
                break
            length = min(len(seq.tokens) - seq.num_cached, budget)
            chunks.append(Chunk(seq, seq.num_cached, length))
            budget -= length
        return chunks
