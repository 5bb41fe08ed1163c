"""The cached attention with a bias per key (Doge's dynamic mask) against a full recompute: the
shipped lean Doge on its tiny config, random weights, a key window shorter than the prompts so that
each decode step drops keys by their cached bias; the op alone against the uncached op."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoConfig

import onboardlm.ops  # noqa: F401  (registers the ops)
from onboardlm.errors import UnsupportedFeature
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.runtime.cache import KVCache
from onboardlm.runtime.engine import CachedModel, build_cached_graph
from onboardlm.testing import assert_rmse_close, tiny_config
from onboardlm.testing.reference import installed_model_type, missing_reference_reason
from onboardlm.transforms.cached_key_bias import cached_attention_key_bias
from onboardlm.transforms.paged_kv_cache import to_paged_attention

OPS = torch.ops.auto_deploy
PROMPT_LENGTHS = (9, 3, 6)
DECODE_STEPS = 4


def test_cached_op_prefill_then_decode_matches_the_uncached_op() -> None:
    generator = torch.Generator().manual_seed(0)
    b, n, kv, d, s = 2, 4, 2, 8, 7
    q, k, v = (torch.randn(b, s, heads, d, generator=generator) for heads in (n, kv, kv))
    bias = torch.randn(b, kv, s, generator=generator)
    caches = torch.zeros(b, 16, kv, d), torch.zeros(b, 16, kv, d), torch.zeros(b, 16, kv)
    expected = OPS.torch_attention_key_bias(q, k, v, bias, 3, True, 0.4, "bsnd")
    first = cached_attention_key_bias(
        q[:, :5],
        k[:, :5],
        v[:, :5],
        bias[..., :5],
        *caches,
        torch.zeros(b, dtype=torch.long),
        5,
        3,
        True,
        0.4,
        "bsnd",
    )
    torch.testing.assert_close(
        first, OPS.torch_attention_key_bias(q[:, :5], k[:, :5], v[:, :5], bias[..., :5], 3, True, 0.4, "bsnd")
    )
    for step in (5, 6):
        out = cached_attention_key_bias(
            q[:, step : step + 1], k[:, step : step + 1], v[:, step : step + 1], bias[..., step : step + 1],
            *caches, torch.full((b,), step), step + 1, 3, True, 0.4, "bsnd",
        )  # fmt: skip
        torch.testing.assert_close(out[:, 0], expected[:, step])


def _doge():
    if installed_model_type("doge") is None:
        pytest.skip(missing_reference_reason("doge"))
    if importlib.util.find_spec("onboardlm.models.custom.modeling_doge") is None:
        pytest.skip("no shipped lean Doge")
    importlib.import_module("onboardlm.models.custom.modeling_doge")
    config = tiny_config(AutoConfig.for_model("doge", keep_window_size=4))
    model = AutoModelForCausalLMFactory(config).build_model().float().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


def test_doge_decode_matches_a_full_recompute() -> None:
    model = _doge()
    graph = build_cached_graph(model)
    assert {spec.name.rsplit("_", 1)[0] for spec in graph.caches} == {"k_cache", "v_cache", "bias_cache"}
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in PROMPT_LENGTHS]
    cached = CachedModel(graph, KVCache.allocate(graph.caches, 4, 32, "cpu"))
    logits = cached.prefill(prompts, DECODE_STEPS)
    sequences = [list(p) for p in prompts]
    for step in range(DECODE_STEPS + 1):
        for row, sequence in enumerate(sequences):
            with torch.no_grad():
                full = model(
                    input_ids=torch.tensor([sequence]), position_ids=torch.arange(len(sequence))[None]
                )
            assert_rmse_close(logits[row], full.logits[0, -1].float(), 1e-4, msg=f"step {step} seq {row}")
        tokens = torch.randint(0, vocab, (len(sequences),))
        for sequence, token in zip(sequences, tokens.tolist(), strict=True):
            sequence.append(token)
        logits = cached.decode(tokens)


def test_paged_cache_refuses_a_bias_per_key() -> None:
    graph = build_cached_graph(_doge())
    with pytest.raises(UnsupportedFeature, match="bias per key"):
        to_paged_attention(graph)
