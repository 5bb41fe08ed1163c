"""The serving engine on a tiny random Llama: continuous batching must not change any request's tokens.

Each request's output is compared with the dense cached model (``onboardlm run``'s path) generating
that prompt alone. The engine is driven step by step (``run_once``), so requests join mid-run at known
steps; a small block size, step budget and running limit force waiting, chunked prefill and block reuse.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.registry.settings import RunSettings
from onboardlm.runtime.cache import KVCache
from onboardlm.runtime.engine import CachedModel, build_cached_graph
from onboardlm.runtime.paged_model import _host_inputs, _split_inputs
from onboardlm.runtime.requests import FinishReason, GenerationRequest, RequestEvent, RequestSampling
from onboardlm.runtime.scheduler import Chunk, QueueFull, Sequence
from onboardlm.runtime.serve_setup import ServeOptions, engine_for_model
from onboardlm.runtime.serving import ContextLengthExceeded, ServingEngine, ShuttingDown
from onboardlm.testing.checkpoints import word_tokenizer

CONFIG = LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=50,
)  # fmt: skip
VOCAB = {"<unk>": 0, "<s>": 1, **{f"w{i}": i for i in range(2, 50)}}
PROMPTS = [(3, 8), (11, 3), (2, 6), (17, 5), (5, 8), (9, 2)]  # (prompt length, max_tokens)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = AutoModelForCausalLMFactory(CONFIG).build_model()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)  # peaked logits: no greedy ties
    return model


@pytest.fixture(scope="module")
def dense(model) -> CachedModel:
    graph = build_cached_graph(model)
    return CachedModel(graph, KVCache.allocate(graph.caches, 1, 64, "cpu"))


def _engine(model, max_waiting: int = 16, fast_path: bool | None = None) -> ServingEngine:
    settings = RunSettings(max_batch_size=4, max_seq_len=32, max_new_tokens=8)
    options = ServeOptions(
        block_size=4, kv_cache_tokens=64, max_step_tokens=8, max_waiting=max_waiting, fast_path=fast_path
    )
    return engine_for_model(model, word_tokenizer(VOCAB), [], settings, options)


class Collector:
    def __init__(self) -> None:
        self.events: dict[str, list[RequestEvent]] = {}

    def __call__(self, event: RequestEvent) -> None:
        self.events.setdefault(event.request_id, []).append(event)

    def tokens(self, rid: str) -> list[int]:
        return [t for e in self.events[rid] for t in e.token_ids]

    def finish(self, rid: str) -> FinishReason | None:
        return self.events[rid][-1].finish


def _request(rid: str, prompt: list[int], max_tokens: int, **sampling) -> GenerationRequest:
    return GenerationRequest(rid, prompt, RequestSampling(max_tokens=max_tokens, **sampling))


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(2, 50, (n,), generator=gen).tolist() for n, _ in PROMPTS]


def _drain(engine: ServingEngine, limit: int = 200) -> None:
    for _ in range(limit):
        engine.run_once()
        if not engine.num_unfinished:
            return
    raise AssertionError("the engine did not finish its requests")


@pytest.mark.parametrize("fast_path", [False, True], ids=["reference", "fast_path"])
def test_requests_joining_mid_run_get_their_solo_tokens_and_free_every_block(model, dense, fast_path) -> None:
    """``fast_path``: the CUDA path's graph rewrites (the reference paged op where Triton does not run),
    every decode step padded to a decode batch size on the cache's spare block as its CUDA graphs are."""
    engine, out = _engine(model, fast_path=fast_path), Collector()
    if fast_path:
        assert engine.model.speed is not None and engine.model._buckets, "decode steps must be padded"
        assert engine.model.spare_block == engine.scheduler.allocator.num_blocks
    prompts = _prompts()
    for i, (prompt, (_, max_tokens)) in enumerate(zip(prompts, PROMPTS, strict=True)):
        engine.submit(_request(str(i), prompt, max_tokens), out)
        engine.run_once()  # each request joins a running batch
    _drain(engine)
    for i, (prompt, (_, max_tokens)) in enumerate(zip(prompts, PROMPTS, strict=True)):
        solo = dense.generate([prompt], max_new_tokens=max_tokens)[0].new_ids
        assert out.tokens(str(i)) == solo, f"request {i}"
        assert out.finish(str(i)) is FinishReason.LENGTH
        assert out.events[str(i)][-1].completion_tokens == max_tokens
    allocator = engine.scheduler.allocator
    assert allocator.num_free == allocator.num_blocks and engine.stats.blocks_used == 0


def test_a_cancelled_request_frees_its_blocks_at_once_and_the_others_are_unaffected(model, dense) -> None:
    engine, out = _engine(model), Collector()
    prompts = _prompts()
    engine.submit(_request("keep", prompts[0], 8), out)
    engine.submit(_request("drop", prompts[3], 8), out)
    for _ in range(4):
        engine.run_once()
    used = engine.scheduler.allocator.num_used
    engine.cancel("drop")
    engine.run_once()
    assert out.finish("drop") is FinishReason.CANCELLED
    assert engine.scheduler.allocator.num_used == used - 7  # 17 + 8 tokens: 7 blocks of 4
    _drain(engine)
    assert out.tokens("keep") == dense.generate([prompts[0]], max_new_tokens=8)[0].new_ids
    assert engine.scheduler.allocator.num_used == 0


def test_stop_tokens_and_stop_strings_end_a_request(model, dense) -> None:
    prompt = _prompts()[4]
    solo = dense.generate([prompt], max_new_tokens=8)[0].new_ids
    engine, out = _engine(model), Collector()
    engine.stop_ids = frozenset({solo[3]})
    engine.submit(_request("token", prompt, 8), out)
    engine.submit(_request("string", prompt, 8, stop=(f"w{solo[2]}",), ignore_eos=True), out)
    _drain(engine)
    cut = solo.index(solo[3])
    assert out.tokens("token") == solo[:cut] and out.finish("token") is FinishReason.STOP
    text = "".join(e.text for e in out.events["string"])
    first = solo.index(solo[2])
    assert text == " ".join(f"w{t}" for t in solo[:first]) + " " and out.finish("string") is FinishReason.STOP


def test_seeded_sampling_does_not_depend_on_the_batch(model) -> None:
    prompts = _prompts()
    runs = []
    for companions in (0, 3):
        engine, out = _engine(model), Collector()
        engine.submit(_request("seeded", prompts[1], 8, temperature=1.5, top_k=20, seed=11), out)
        for i in range(companions):
            engine.submit(_request(f"other{i}", prompts[i + 2], 8, temperature=1.0), out)
        _drain(engine)
        runs.append(out.tokens("seeded"))
    assert runs[0] == runs[1] and len(runs[0]) == 8


def test_bad_requests_are_refused_at_submit(model) -> None:
    engine, out = _engine(model, max_waiting=1), Collector()
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 32 tokens.*40 tokens"):
        engine.submit(_request("long", [2] * 30, 10), out)
    with pytest.raises(ValueError, match="token id 50 is outside the vocabulary"):
        engine.submit(_request("vocab", [2, 50], 4), out)
    with pytest.raises(ValueError, match="no tokens"):
        engine.submit(_request("empty", [], 4), out)
    with pytest.raises(ValueError, match="top_p"):
        engine.submit(_request("top_p", [2, 3], 4, top_p=0.0), out)
    engine.submit(_request("a", [2, 3], 4), out)
    with pytest.raises(QueueFull):
        engine.submit(_request("b", [2, 3], 4), out)
    engine.start()
    engine.shutdown(timeout=10)
    assert out.finish("a") is FinishReason.LENGTH
    with pytest.raises(ShuttingDown):
        engine.submit(_request("c", [2, 3], 4), out)


def test_a_failing_model_step_ends_its_requests_with_an_error_and_frees_their_blocks(model) -> None:
    engine, out = _engine(model), Collector()

    def broken(chunks):
        raise RuntimeError("boom")

    engine.model.step = broken
    engine.submit(_request("a", [2, 3, 4], 4), out)
    engine.run_once()
    assert out.finish("a") is FinishReason.ERROR and out.events["a"][-1].error == "boom"
    assert engine.scheduler.allocator.num_used == 0 and engine.num_unfinished == 0


def test_padded_decode_rows_point_at_the_spare_block() -> None:
    seqs = [Sequence(_request(f"r{i}", [5] * (3 + i), 4), [i * 2, i * 2 + 1]) for i in range(2)]
    for seq in seqs:
        seq.num_cached = len(seq.tokens) - 1
    chunks = [Chunk(seq, seq.num_cached, 1) for seq in seqs]
    inputs = _split_inputs(_host_inputs(chunks, 4, 3, rows=4, spare=9), 4, 4, 3)
    assert inputs["input_ids"].tolist() == [[5, 5, 0, 0]]
    assert inputs["position_ids"].tolist() == [[2, 3, 0, 0]]
    assert inputs["slot_mapping"].tolist() == [2, 11, 36, 36]
    assert inputs["block_tables"].tolist() == [[0, 1, 0], [2, 3, 0], [9, 9, 9], [9, 9, 9]]
    assert inputs["query_start"].tolist() == [0, 1, 2, 3, 4]
    assert inputs["cached_lens"].tolist() == [2, 3, 0, 0]
    assert inputs["logit_index"].tolist() == [0, 1, 2, 3]
