"""A bounded load test on the tiny model: 1,000 mixed requests, 32 at a time, over the openai client.

Good requests (whole and streamed, greedy and seeded), malformed ones, unknown models, prompts too long
for the context and streams the client abandons after the first chunk, interleaved. Every request must
get its right answer or its right error, none may be lost, every KV block must be free at the end, and
the process's memory must stay flat between the first 200 requests and the last 800.
"""

from __future__ import annotations

import asyncio
import time

import httpx2 as httpx
import openai
import psutil
import pytest

from .conftest import TINY, TINY_SETTINGS

PROMPTS = [
    "Hello there",
    "The capital of France is",
    "1 2 3 4 5 6 7",
    "Once upon a time",
    "Why is the sky blue?",
]
TOTAL, CONCURRENCY, DEADLINE_S = 1000, 32, 240
KINDS = ("whole", "whole", "whole", "stream", "seeded", "malformed", "unknown_model", "too_long", "abandoned", "whole")  # fmt: skip


async def _expected(api: openai.AsyncOpenAI) -> list[list[int]]:
    answers = []
    for prompt in PROMPTS:
        answer = await api.completions.create(
            model=TINY, prompt=prompt, max_tokens=4, temperature=0, extra_body={"return_token_ids": True}
        )
        answers.append(answer.choices[0].token_ids)
    return answers


async def _one(i: int, api: openai.AsyncOpenAI, raw: httpx.AsyncClient, expected: list[list[int]]) -> str:
    """Send request ``i``; returns its kind once its answer or error checked out (raises otherwise)."""
    kind, prompt, max_tokens = KINDS[i % len(KINDS)], PROMPTS[i % len(PROMPTS)], 1 + i % 4
    want = expected[i % len(PROMPTS)][:max_tokens]
    extra = {"return_token_ids": True}
    if kind == "whole":
        answer = await api.completions.create(model=TINY, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra)  # fmt: skip
        assert answer.choices[0].token_ids == want and answer.usage.completion_tokens == len(want)
    elif kind == "stream":
        stream = await api.completions.create(
            model=TINY, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, extra_body=extra
        )
        assert [t async for chunk in stream for t in chunk.choices[0].token_ids] == want
    elif kind == "seeded":
        answer = await api.completions.create(model=TINY, prompt=prompt, max_tokens=max_tokens, temperature=1.0, seed=i)  # fmt: skip
        assert answer.usage.completion_tokens <= max_tokens and answer.choices[0].finish_reason in (
            "stop",
            "length",
        )
    elif kind == "malformed":
        body = b'{"model": "tiny", "prompt": ' if i % 2 else b'{"model": "tiny", "prompt": "x", "top_p": 7}'
        response = await raw.post(
            "/v1/completions", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    elif kind == "unknown_model":
        with pytest.raises(openai.NotFoundError):
            await api.completions.create(model="no-such-model", prompt=prompt, max_tokens=max_tokens)
    elif kind == "too_long":
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            await api.completions.create(model=TINY, prompt=[5] * TINY_SETTINGS.max_seq_len, max_tokens=1)
    else:  # abandoned: the client reads one chunk of a long answer and closes the stream
        stream = await api.completions.create(
            model=TINY, prompt=prompt, max_tokens=400, stream=True, extra_body={"ignore_eos": True}
        )
        async for _ in stream:
            break
        await stream.close()
    return kind


async def _load(url: str) -> tuple[dict[str, int], int, int]:
    api = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as raw:
        expected = await _expected(api)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def bounded(i: int) -> str:
            async with gate:
                return await _one(i, api, raw, expected)

        rss = []
        done: dict[str, int] = {}
        for batch in (range(0, 200), range(200, TOTAL)):
            for kind in await asyncio.gather(*(bounded(i) for i in batch)):
                done[kind] = done.get(kind, 0) + 1
            rss.append(psutil.Process().memory_info().rss)
    await api.close()
    return done, rss[0], rss[1]


@pytest.mark.slow
def test_a_thousand_mixed_requests_are_each_answered_right_and_leave_no_block_behind(tiny_server) -> None:
    started = time.monotonic()
    done, rss_warm, rss_end = asyncio.run(asyncio.wait_for(_load(tiny_server.url), DEADLINE_S))
    assert sum(done.values()) == TOTAL  # none lost
    assert done == {kind: KINDS.count(kind) * TOTAL // len(KINDS) for kind in set(KINDS)}
    engine = tiny_server.engine
    deadline = time.monotonic() + 20
    while engine.num_unfinished or engine.scheduler.allocator.num_used:
        assert time.monotonic() < deadline, "requests or KV blocks left behind"
        time.sleep(0.05)
    assert engine.scheduler.allocator.num_free == engine.scheduler.allocator.num_blocks
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert rss_end - rss_warm < 64 * 2**20, f"memory grew by {(rss_end - rss_warm) / 2**20:.0f} MiB"
    print(f"{TOTAL} requests in {time.monotonic() - started:.1f} s")
