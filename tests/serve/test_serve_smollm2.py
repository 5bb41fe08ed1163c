"""SmolLM2 (shipped GGUF) over HTTP with the openai client: the server's greedy answers are
``onboardlm run``'s, token for token, whether requests come alone, streamed, or 32 at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from onboardlm.runtime.cache import KVCache
from onboardlm.runtime.chat import encode_chat_prompt
from onboardlm.runtime.engine import CachedModel
from onboardlm.runtime.prompts import default_prompts
from onboardlm.runtime.runner import Runner

from .conftest import SMOLLM2, client

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runner(smollm2_runner: Runner) -> Runner:
    return smollm2_runner


def _chat(api, prompt: str, **kwargs):
    return api.chat.completions.create(
        model=SMOLLM2, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=32,
        extra_body={"return_token_ids": True}, **kwargs,
    )  # fmt: skip


def test_greedy_answers_to_the_default_prompts_equal_onboardlm_run(smollm2_server, runner) -> None:
    expected = runner.run()  # batches of 8 and 2, as `onboardlm run` answers them
    api = client(smollm2_server)
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda p: _chat(api, p), default_prompts()))
    for result, answer in zip(expected, answers, strict=True):
        choice = answer.choices[0]
        assert choice.token_ids == result.new_token_ids, f"[PROMPT {result.index}] differs"
        assert choice.message.content.strip() == result.output
        assert choice.finish_reason == ("stop" if result.stopped_on_eos else "length")
        assert answer.usage.prompt_tokens == result.prompt_tokens
        assert answer.usage.completion_tokens == len(result.new_token_ids)
    assert (
        "Iceland" in answers[3].choices[0].message.content
        or "Reykjav" in answers[3].choices[0].message.content
    )


def test_streamed_chunks_concatenate_to_the_whole_answer(smollm2_server) -> None:
    api = client(smollm2_server)
    for prompt in default_prompts()[:3]:
        whole = _chat(api, prompt)
        chunks = list(_chat(api, prompt, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        ids = [t for c in chunks if c.choices for t in c.choices[0].token_ids]
        assert text == whole.choices[0].message.content and ids == whole.choices[0].token_ids
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_32_concurrent_requests_of_different_lengths_equal_their_solo_answers(smollm2_server, runner) -> None:
    prompts = [
        encode_chat_prompt(runner.tokenizer, f"{default_prompts()[i % 10]} {'Please answer briefly. ' * (i % 4)}")[: 20 + 7 * i]
        for i in range(32)
    ]  # fmt: skip
    max_tokens = [4 + (i * 5) % 13 for i in range(32)]
    api = client(smollm2_server)

    def ask(i: int):
        return api.completions.create(
            model=SMOLLM2, prompt=prompts[i], max_tokens=max_tokens[i], temperature=0,
            extra_body={"return_token_ids": True},
        )  # fmt: skip

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    solo = CachedModel(runner.graph, KVCache.allocate(runner.graph.caches, 1, 512, "cpu"))
    for i, answer in enumerate(answers):
        expected = solo.generate([prompts[i]], max_new_tokens=max_tokens[i], stop_ids=runner.stop_ids)[0]
        assert answer.choices[0].token_ids == expected.new_ids, f"request {i} ({len(prompts[i])} tokens)"
    engine = smollm2_server.engine
    assert engine.num_unfinished == 0 and engine.scheduler.allocator.num_used == 0
