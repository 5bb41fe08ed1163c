"""Elementwise fusion and the CUDA-graph runner keep the cached graph's logits (CPU checks).

The fused functions are checked eagerly here (the GPU test runs them compiled); :class:`FastGraph`
without CUDA runs the graph directly, and refuses a cache it is not bound to.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig

from onboardlm.export import causal_lm_dynamic_shapes, torch_export_to_gm
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.testing.cached import prefill_then_decode
from onboardlm.transforms import insert_cached_attention, insert_logit_gather
from onboardlm.transforms.backends import use_direct_kernels
from onboardlm.transforms.compile import FastGraph, SpeedOptions, uncapturable_reason
from onboardlm.transforms.fast_attention import use_fast_attention
from onboardlm.transforms.fusion import fuse_elementwise

CONFIG = LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=64,
)  # fmt: skip
BATCH, SEQ = 2, 6


@pytest.fixture
def model_and_graph():
    model = AutoModelForCausalLMFactory(CONFIG).build_model()
    ids = torch.zeros(BATCH, SEQ, dtype=torch.long)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    gm = torch_export_to_gm(
        model, kwargs={"input_ids": ids, "position_ids": positions}, dynamic_shapes=causal_lm_dynamic_shapes()
    )
    graph = insert_cached_attention(gm)
    insert_logit_gather(graph.gm)
    return model, graph


def _prefill_and_decode(run, graph, ids: torch.Tensor, caches: dict) -> list[torch.Tensor]:
    return list(prefill_then_decode(run, caches, ids, SEQ - 1))


def _caches(graph) -> dict[str, torch.Tensor]:
    return {s.name: torch.zeros(BATCH, SEQ, *s.features, dtype=s.dtype) for s in graph.caches}


def _expected(model, ids: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=torch.arange(SEQ).expand(BATCH, SEQ)).logits
    return [logits[:, -2], logits[:, -1]]


@pytest.mark.parametrize("direct_kernels", [False, True])
def test_fused_graph_gives_the_model_logits(model_and_graph, direct_kernels: bool) -> None:
    model, graph = model_and_graph
    if direct_kernels:
        use_direct_kernels(graph.gm)
    use_fast_attention(graph.gm)
    layers = CONFIG.num_hidden_layers
    # the first norm alone; the other norms (two per layer, the last the final norm) with their residual
    # add; one RoPE and one SiLU-mul per layer
    assert fuse_elementwise(graph.gm, compile=False) == 1 + 2 * layers + layers + layers
    targets = [str(n.target) for n in graph.gm.graph.nodes if n.op == "call_function"]
    assert not any("silu" in t and "silu_mul" not in t for t in targets)
    assert sum("add_rmsnorm" in t for t in targets) == 2 * layers
    assert sum("torch_rmsnorm" in t for t in targets) == 1
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ))
    got = _prefill_and_decode(graph.gm, graph, ids, _caches(graph))
    for actual, expected in zip(got, _expected(model, ids), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_fast_graph_on_cpu_runs_the_graph_and_captures_nothing(model_and_graph) -> None:
    model, graph = model_and_graph
    use_fast_attention(graph.gm)
    caches = _caches(graph)
    fast = FastGraph(graph.gm, caches, SpeedOptions())
    assert fast.capture().captured == [] and fast.step is graph.gm
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ))
    for actual, expected in zip(
        _prefill_and_decode(fast, graph, ids, caches), _expected(model, ids), strict=True
    ):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bound to its own KV cache"):
        _prefill_and_decode(fast, graph, ids, _caches(graph))


def test_graphs_with_host_synchronising_ops_are_not_captured(model_and_graph) -> None:
    _, graph = model_and_graph
    assert uncapturable_reason(graph.gm) is None
    node = next(n for n in graph.gm.graph.nodes if n.op == "call_function" and "silu" in str(n.target))
    node.target = torch.ops.auto_deploy.torch_moe.default
    assert "torch_moe" in uncapturable_reason(graph.gm)


def test_fused_functions_compile_without_falling_back(model_and_graph, caplog) -> None:
    """Compiled (inductor on the CPU here), every fused function keeps the logits; none falls back to eager.

    A function dynamo cannot trace runs eagerly with a warning, silently losing the fusion on a GPU.
    """
    model, graph = model_and_graph
    use_fast_attention(graph.gm)
    fuse_elementwise(graph.gm, compile=True)
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ))
    with caplog.at_level(logging.WARNING, logger="onboardlm.transforms.fusion"):
        got = _prefill_and_decode(graph.gm, graph, ids, _caches(graph))
    assert not [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    for actual, expected in zip(got, _expected(model, ids), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
