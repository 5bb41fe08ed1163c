"""The cached generate loop against the cache-free reference decoder, stops, limits and bad requests."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from onboardlm.errors import OnboardlmError
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.registry.settings import SamplingSettings
from onboardlm.runtime.cache import KVCache
from onboardlm.runtime.engine import CachedModel, build_cached_graph
from onboardlm.runtime.generate import greedy_generate
from onboardlm.runtime.timings import DecodeTimings

CONFIG = LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=50,
)  # fmt: skip
NEW = 8


@pytest.fixture(scope="module")
def model_and_graph():
    torch.manual_seed(0)
    model = AutoModelForCausalLMFactory(CONFIG).build_model()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)  # peaked logits: greedy ties are out of the question
    return model, build_cached_graph(model)


@pytest.fixture
def prompts() -> list[list[int]]:
    return [torch.randint(0, CONFIG.vocab_size, (n,)).tolist() for n in (6, 2, 11)]


def _cached(graph, batch: int = 4, seq: int = 32) -> CachedModel:
    return CachedModel(graph, KVCache.allocate(graph.caches, batch, seq, "cpu"))


def test_batched_greedy_equals_the_cache_free_decoder_per_prompt(model_and_graph, prompts) -> None:
    model, graph = model_and_graph
    results = _cached(graph).generate(prompts, max_new_tokens=NEW)
    for prompt, result in zip(prompts, results, strict=True):
        expected = greedy_generate(model, prompt, max_new_tokens=NEW)
        assert result.new_ids == expected.new_ids
        assert result.prompt_ids == prompt and not result.stopped_on_eos


def test_a_sequence_stops_at_its_first_stop_token(model_and_graph, prompts) -> None:
    _, graph = model_and_graph
    free = _cached(graph).generate(prompts, max_new_tokens=NEW)
    stop = free[0].new_ids[2]
    stopped = _cached(graph).generate(prompts, max_new_tokens=NEW, stop_ids=[stop])
    for before, after in zip(free, stopped, strict=True):
        cut = before.new_ids.index(stop) if stop in before.new_ids else None
        assert after.new_ids == before.new_ids[:cut]
        assert after.stopped_on_eos == (cut is not None)
    assert len(stopped[0].new_ids) <= 2


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(model_and_graph, prompts) -> None:
    _, graph = model_and_graph
    settings = SamplingSettings(temperature=3.0, seed=123)
    first = _cached(graph).generate(prompts, max_new_tokens=NEW, sampling=settings)
    again = _cached(graph).generate(prompts, max_new_tokens=NEW, sampling=settings)
    greedy = _cached(graph).generate(prompts, max_new_tokens=NEW)
    assert [r.new_ids for r in first] == [r.new_ids for r in again]
    assert [r.new_ids for r in first] != [r.new_ids for r in greedy]
    assert all(len(r.new_ids) == NEW for r in first)


def test_a_prompt_longer_than_the_cache_is_refused(model_and_graph) -> None:
    _, graph = model_and_graph
    with pytest.raises(OnboardlmError, match=r"prompt 1 \(30 tokens\).*max_seq_len 32"):
        _cached(graph).generate([[1] * 3, [1] * 30], max_new_tokens=NEW)


def test_a_batch_larger_than_the_cache_is_refused(model_and_graph) -> None:
    _, graph = model_and_graph
    with pytest.raises(OnboardlmError, match=r"batch of 5 prompts.*max_batch_size 4"):
        _cached(graph).generate([[1, 2]] * 5, max_new_tokens=NEW)


def test_timings_count_the_first_token_apart_from_the_decode_steps(model_and_graph, prompts) -> None:
    """Two batches of 3 sequences, 8 new tokens each, no stop: 2 first tokens and 2 x 3 x 7 decode rows."""
    _, graph = model_and_graph
    model, timings = _cached(graph), DecodeTimings()
    for _ in range(2):
        model.generate(prompts, max_new_tokens=NEW, timings=timings)
    assert timings.first_token_batches == 2 and timings.decode_tokens == 2 * len(prompts) * (NEW - 1)
    assert timings.first_token_s > 0 and timings.decode_s > 0
    one_token = DecodeTimings()
    model.generate(prompts, max_new_tokens=1, timings=one_token)
    assert one_token.decode_tokens == 0 and one_token.decode_s < one_token.first_token_s
