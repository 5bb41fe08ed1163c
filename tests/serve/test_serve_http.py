"""The HTTP API on a tiny random Llama: endpoints, OpenAI-shaped errors, streaming, cancellation on
disconnect, a full queue and the metrics."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest

from onboardlm.runtime.serve_setup import ServeOptions

from .conftest import TINY, TINY_SETTINGS, client, start

PROMPTS = ["Hello there", "The capital of France is", "1 2 3 4 5 6 7", "Once upon a time"]


def _answers(api, max_tokens: int = 8) -> list[str]:
    return [
        api.completions.create(model=TINY, prompt=p, max_tokens=max_tokens).choices[0].text for p in PROMPTS
    ]


def _idle(server, seconds: float = 20.0) -> None:
    """Wait until the engine holds no request and no KV block."""
    deadline = time.monotonic() + seconds
    engine = server.engine
    while engine.num_unfinished or engine.scheduler.allocator.num_used:
        assert time.monotonic() < deadline, "the engine kept requests or blocks"
        time.sleep(0.02)


def _metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_models_health_and_metrics(tiny_server) -> None:
    models = client(tiny_server).models.list().data
    assert [m.id for m in models] == [TINY] and models[0].max_model_len == TINY_SETTINGS.max_seq_len
    assert httpx.get(tiny_server.url + "/health").json() == {"status": "ok"}
    _answers(client(tiny_server))
    text = httpx.get(tiny_server.url + "/metrics").text
    for name in (
        "onboardlm_queue_length", "onboardlm_running_requests", "onboardlm_kv_blocks_used",
        "onboardlm_kv_blocks_total", "onboardlm_generation_tokens_per_second",
        "onboardlm_time_to_first_token_seconds_bucket", "onboardlm_time_per_output_token_seconds_bucket",
    ):  # fmt: skip
        assert name in text
    assert _metric(tiny_server, 'onboardlm_requests_total{outcome="length"}') >= 4


def test_prompts_as_text_or_token_ids_and_chat_give_the_same_tokens(tiny_server) -> None:
    api = client(tiny_server)
    ids = tiny_server.engine.tokenizer.encode(PROMPTS[1])
    by_text = api.completions.create(
        model=TINY, prompt=PROMPTS[1], max_tokens=6, extra_body={"return_token_ids": True}
    )
    by_ids = api.completions.create(
        model=TINY, prompt=ids, max_tokens=6, extra_body={"return_token_ids": True}
    )
    assert (
        by_text.choices[0].token_ids == by_ids.choices[0].token_ids and len(by_ids.choices[0].token_ids) == 6
    )
    assert by_ids.usage.prompt_tokens == len(ids) and by_ids.usage.total_tokens == len(ids) + 6
    chat = api.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 3
    stream = api.completions.create(model=TINY, prompt=PROMPTS[1], max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in stream) == by_text.choices[0].text


LIMIT = TINY_SETTINGS.max_seq_len


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": "gpt-4", "prompt": "hi"}, 404, "model", "model_not_found"),
        ({"prompt": "hi"}, 400, "model", None),
        ({"model": TINY, "prompt": "hi", "temperature": -1}, 400, "temperature", None),
        ({"model": TINY, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
        ({"model": TINY, "prompt": "hi", "n": 2}, 400, "n", None),
        ({"model": TINY, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
        ({"model": TINY, "prompt": ""}, 400, "prompt", None),
        ({"model": TINY, "prompt": ["a", "b"]}, 400, "prompt", None),
        ({"model": TINY, "prompt": [1, 10**9]}, 400, "prompt", None),
        ({"model": TINY, "prompt": [5] * LIMIT, "max_tokens": 1}, 400, "prompt", "context_length_exceeded"),
        ({"model": TINY, "prompt": "hi", "max_tokens": LIMIT}, 400, "prompt", "context_length_exceeded"),
    ],
)
def test_bad_requests_get_openai_errors(tiny_server, body, status, param, code) -> None:
    response = httpx.post(tiny_server.url + "/v1/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == code and error["message"]
    if code == "context_length_exceeded":
        assert f"maximum context length is {LIMIT} tokens" in error["message"]


def test_malformed_json_and_unknown_routes_get_openai_errors(tiny_server) -> None:
    bad = httpx.post(tiny_server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})  # fmt: skip
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.get(tiny_server.url + "/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    empty = httpx.post(tiny_server.url + "/v1/chat/completions", json={"model": TINY, "messages": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "messages"


def test_a_request_cancelled_mid_stream_frees_its_blocks_and_the_next_are_unaffected(tiny_server) -> None:
    api = client(tiny_server)
    before = _answers(api)
    cancelled = _metric(tiny_server, 'onboardlm_requests_total{outcome="cancelled"}')
    stream = api.completions.create(model=TINY, prompt=PROMPTS[0], max_tokens=450, stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert tiny_server.engine.scheduler.allocator.num_used > 0
    stream.close()
    _idle(tiny_server)
    assert _metric(tiny_server, 'onboardlm_requests_total{outcome="cancelled"}') == cancelled + 1
    assert _answers(api) == before


def test_a_client_that_gives_up_on_a_whole_answer_cancels_it(tiny_server) -> None:
    cancelled = _metric(tiny_server, 'onboardlm_requests_total{outcome="cancelled"}')
    body = {"model": TINY, "prompt": PROMPTS[2], "max_tokens": 450, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(tiny_server.url + "/v1/completions", json=body, timeout=0.3)
    _idle(tiny_server)
    assert _metric(tiny_server, 'onboardlm_requests_total{outcome="cancelled"}') == cancelled + 1


def test_a_full_queue_is_answered_503(tiny_model) -> None:
    settings = TINY_SETTINGS.model_copy(update={"max_batch_size": 1})
    with start(str(tiny_model), TINY, settings, ServeOptions(block_size=8, max_waiting=1)) as server:
        body = {"model": TINY, "prompt": PROMPTS[0], "max_tokens": 100, "ignore_eos": True}
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: httpx.post(server.url + "/v1/completions", json=body, timeout=60), range(6)))  # fmt: skip
        statuses = sorted(r.status_code for r in responses)
        assert statuses[0] == 200 and statuses[-1] == 503 and set(statuses) == {200, 503}
        refused = [r for r in responses if r.status_code == 503]
        assert all(r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"] for r in refused)
        _idle(server)
