"""Block allocator and continuous-batching scheduler, without a model."""

from __future__ import annotations

import pytest

from onboardlm.runtime.paged_cache import BlockAllocator, blocks_for
from onboardlm.runtime.requests import GenerationRequest, RequestSampling
from onboardlm.runtime.scheduler import QueueFull, Scheduler, SchedulerLimits


def _request(rid: str, prompt: int, max_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(rid, list(range(1, prompt + 1)), RequestSampling(max_tokens=max_tokens))


def _run_step(scheduler: Scheduler) -> list[tuple[str, int, int]]:
    """Schedule a step and pretend it ran: caches advance, sampling chunks append a token."""
    chunks = scheduler.schedule()
    for chunk in chunks:
        chunk.seq.num_cached += chunk.length
        if chunk.samples:
            chunk.seq.tokens.append(7)
    return [(c.seq.request_id, c.start, c.length) for c in chunks]


def test_the_allocator_hands_out_each_block_once_and_takes_it_back() -> None:
    allocator = BlockAllocator(4, 16)
    first, second = allocator.allocate(3), allocator.allocate(1)
    assert sorted(first + second) == [0, 1, 2, 3] and allocator.num_free == 0
    with pytest.raises(MemoryError, match="1 KV blocks asked for, 0 free"):
        allocator.allocate(1)
    allocator.free(first)
    assert allocator.num_free == 3 and allocator.num_used == 1
    with pytest.raises(ValueError, match="not in use"):
        allocator.free(first[:1])
    assert blocks_for(16, 16) == 1 and blocks_for(17, 16) == 2


def test_requests_wait_for_blocks_and_join_when_others_free_them() -> None:
    scheduler = Scheduler(
        BlockAllocator(4, 4), SchedulerLimits(max_running=8, max_step_tokens=64, max_waiting=8)
    )
    for rid in "abc":
        scheduler.add(_request(rid, prompt=4, max_tokens=4))  # 2 blocks each: only two fit
    assert [r for r, _, _ in _run_step(scheduler)] == ["a", "b"]
    assert [r.request_id for r in scheduler.waiting] == ["c"]
    scheduler.cancel("a")
    assert scheduler.allocator.num_free == 2
    assert _run_step(scheduler) == [("b", 4, 1), ("c", 0, 4)]  # decode first, then the new prompt
    scheduler.finish(scheduler.running["b"])
    scheduler.finish(scheduler.running["c"])
    assert scheduler.allocator.num_free == 4 and not scheduler.has_work()


def test_long_prompts_are_prefilled_in_chunks_beside_the_decodes() -> None:
    scheduler = Scheduler(
        BlockAllocator(64, 4), SchedulerLimits(max_running=4, max_step_tokens=8, max_waiting=8)
    )
    scheduler.add(_request("short", prompt=3))
    assert _run_step(scheduler) == [("short", 0, 3)]
    scheduler.add(_request("long", prompt=20))
    assert _run_step(scheduler) == [("short", 3, 1), ("long", 0, 7)]
    assert _run_step(scheduler) == [("short", 4, 1), ("long", 7, 7)]
    assert _run_step(scheduler) == [("short", 5, 1), ("long", 14, 6)]
    assert _run_step(scheduler) == [("short", 6, 1), ("long", 20, 1)]


def test_a_full_queue_and_a_request_larger_than_the_cache_are_refused() -> None:
    scheduler = Scheduler(
        BlockAllocator(2, 4), SchedulerLimits(max_running=1, max_step_tokens=4, max_waiting=1)
    )
    with pytest.raises(ValueError, match="needs 3 KV blocks, the cache has 2"):
        scheduler.add(_request("big", prompt=8, max_tokens=2))
    scheduler.add(_request("a", prompt=2))
    with pytest.raises(QueueFull):
        scheduler.add(_request("b", prompt=2))
    assert scheduler.cancel("a") and not scheduler.cancel("a")


def test_limits_must_hold_one_decode_token_per_running_sequence() -> None:
    with pytest.raises(ValueError, match="max_step_tokens"):
        SchedulerLimits(max_running=8, max_step_tokens=4, max_waiting=1)
