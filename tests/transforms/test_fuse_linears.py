"""Shared-input linear fusion keeps a cached graph's logits and drops the separate weights (CPU, fp32).

Tiny random lean models, exported and cached as ``onboardlm run`` does: Llama (GQA), Qwen3 (q/k
norms), Qwen2 (q/k/v biases), Qwen3-MoE (experts and router untouched) and DeepSeek-V3 (MLA:
``q_a_proj`` with ``kv_a_proj_with_mqa``; shared experts). Each case lists the projections expected to
fuse; the fused weight must be their checkpoint tensors concatenated, the originals must be gone, and
prefill + decode logits must match the unfused graph's. Toy graphs check the grouping rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, symbolic_trace
from transformers import (
    DeepseekV3Config,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.runtime.engine import build_cached_graph
from onboardlm.testing.cached import prefill_then_decode
from onboardlm.transforms import CachedGraph
from onboardlm.transforms.compile import SpeedOptions, accelerate
from onboardlm.transforms.fuse_linears import LINEAR_TARGETS, fuse_shared_input_linears

BATCH, SEQ = 2, 7
_COMMON = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
    max_position_embeddings=32,
)  # fmt: skip
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


@dataclass(frozen=True)
class Case:
    make_config: Callable[[], PretrainedConfig]
    groups: list[tuple[str, ...]]  # module paths of the linears fused together


def _per_layer(*groups: tuple[str, ...], layers: tuple[int, ...] = (0, 1)) -> list[tuple[str, ...]]:
    return [tuple(f"model.layers.{i}.{path}" for path in group) for i in layers for group in groups]


CASES = {
    "llama": Case(lambda: LlamaConfig(intermediate_size=64, **_COMMON), _per_layer(QKV, GATE_UP)),
    "qwen3": Case(lambda: Qwen3Config(intermediate_size=64, head_dim=8, **_COMMON), _per_layer(QKV, GATE_UP)),
    # q/k/v with bias, gate/up without: two groups per layer all the same
    "qwen2": Case(lambda: Qwen2Config(intermediate_size=64, **_COMMON), _per_layer(QKV, GATE_UP)),
    "qwen3_moe": Case(
        lambda: Qwen3MoeConfig(
            intermediate_size=64,
            moe_intermediate_size=16,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            **_COMMON,
        ),  # fmt: skip
        _per_layer(QKV) + _per_layer(GATE_UP, layers=(1,)),
    ),
    "deepseek_v3": Case(
        lambda: DeepseekV3Config(
            intermediate_size=64,
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
            **{**_COMMON, "num_key_value_heads": 4},
        ),  # fmt: skip
        _per_layer(("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"))
        + _per_layer(GATE_UP, layers=(0,))
        + _per_layer(("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"), layers=(1,)),
    ),
}


def _random_model(config: PretrainedConfig) -> nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLMFactory(config).build_model()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model.eval()


def _caches(graph: CachedGraph) -> dict[str, torch.Tensor]:
    return {s.name: torch.zeros(BATCH, SEQ, *s.features, dtype=s.dtype) for s in graph.caches}


def _prefill_and_decode(
    graph: CachedGraph,
    ids: torch.Tensor,
    caches: dict[str, torch.Tensor] | None = None,
    run: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits of the last prompt token and of one decoded token (on a fresh cache unless given)."""
    caches = _caches(graph) if caches is None else caches
    return prefill_then_decode(graph.gm if run is None else run, caches, ids, SEQ - 1)


def _linear_count(gm: GraphModule) -> int:
    return sum(n.op == "call_function" and n.target in LINEAR_TARGETS for n in gm.graph.nodes)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


@pytest.mark.parametrize("name", CASES)
def test_fused_graph_keeps_logits_and_drops_separate_weights(name: str) -> None:
    case = CASES[name]
    model = _random_model(case.make_config())
    checkpoint = {k: v.detach().clone() for k, v in _tensors(model).items()}
    graph = build_cached_graph(model)
    ids = torch.randint(0, _COMMON["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    expected = _prefill_and_decode(graph, ids)
    before = _linear_count(graph.gm)

    assert fuse_shared_input_linears(graph.gm) == len(case.groups)

    assert before - _linear_count(graph.gm) == sum(len(group) - 1 for group in case.groups)
    tensors = _tensors(graph.gm)
    for group in case.groups:
        kinds = ("weight", "bias") if f"{group[0]}.bias" in checkpoint else ("weight",)
        for kind in kinds:
            fused = tensors.pop(f"{group[0]}.{kind}_fused")
            torch.testing.assert_close(fused, torch.cat([checkpoint[f"{p}.{kind}"] for p in group]))
            assert not any(f"{p}.{kind}" in tensors for p in group)
    assert all(k in checkpoint for k in tensors)  # everything else is untouched (experts, routers)
    for key, tensor in tensors.items():
        torch.testing.assert_close(tensor, checkpoint[key], rtol=0, atol=0)
    torch.testing.assert_close(_prefill_and_decode(graph, ids), expected, rtol=1e-5, atol=1e-5)

    code, names = graph.gm.code, set(_tensors(graph.gm))
    assert fuse_shared_input_linears(graph.gm) == 0
    assert graph.gm.code == code and set(_tensors(graph.gm)) == names


class _Toy(nn.Module):
    """Linears over one input: two without bias (one via aten), two with bias, one computed weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 4, bias=False), nn.Linear(8, 6, bias=False)
        self.c, self.d = nn.Linear(8, 4), nn.Linear(8, 2)
        self.e = nn.Linear(8, 3, bias=False)
        self.f = nn.Linear(4, 5, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = F.linear(x, self.a.weight)
        b = torch.ops.aten.linear.default(x, self.b.weight)
        c = F.linear(x, self.c.weight, self.c.bias) + self.c.weight.sum()  # c's weight read elsewhere too
        d = F.linear(x, self.d.weight, bias=self.d.bias)
        e = F.linear(x, self.e.weight * 2.0)  # computed weight: not fused
        f = F.linear(a, self.f.weight)  # the only linear of its input
        return a, b, c, d, e, f


def test_grouping_rules_and_deletion() -> None:
    toy = _Toy()
    gm = symbolic_trace(toy)
    x = torch.randn(3, 5, 8)
    expected = toy(x)

    assert fuse_shared_input_linears(gm) == 2  # {a, b} and {c, d}

    tensors = _tensors(gm)
    assert {"a.weight", "b.weight", "d.weight", "d.bias", "c.bias"}.isdisjoint(tensors)
    assert {"c.weight", "e.weight", "f.weight", "a.weight_fused", "c.weight_fused", "c.bias_fused"} <= set(
        tensors
    )
    torch.testing.assert_close(tensors["c.bias_fused"], torch.cat([toy.c.bias, toy.d.bias]).detach())
    for actual, reference in zip(gm(x), expected, strict=True):
        torch.testing.assert_close(actual, reference, rtol=1e-6, atol=1e-6)
    assert fuse_shared_input_linears(gm) == 0


class _MixedDtypes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w32 = nn.Parameter(torch.randn(4, 8))
        self.w64 = nn.Parameter(torch.randn(4, 8, dtype=torch.float64))
        self.w16 = nn.Parameter(torch.randn(4, 8).to(torch.float8_e4m3fn), requires_grad=False)
        self.w16b = nn.Parameter(torch.randn(4, 8).to(torch.float8_e4m3fn), requires_grad=False)
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (
            F.linear(x, self.w32),
            F.linear(x, self.w64),  # another dtype
            F.linear(x, self.w32, self.b),  # with bias: its own group
            F.linear(x, self.w16),  # fp8: never fused
            F.linear(x, self.w16b),
        )


def test_mixed_dtypes_bias_and_quantized_weights_are_not_fused() -> None:
    gm = symbolic_trace(_MixedDtypes())  # traced only: these linears cannot all run on one input
    code = gm.code
    assert fuse_shared_input_linears(gm) == 0
    assert gm.code == code


@pytest.mark.parametrize("fuse_linears", [True, False])
def test_accelerate_fuses_linears_when_asked(fuse_linears: bool) -> None:
    model = _random_model(CASES["llama"].make_config())
    graph = build_cached_graph(model)
    ids = torch.randint(0, _COMMON["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    expected = _prefill_and_decode(graph, ids)
    before = _linear_count(graph.gm)
    caches = _caches(graph)
    fast = accelerate(graph.gm, caches, SpeedOptions(fuse_linears=fuse_linears))
    assert before - _linear_count(graph.gm) == (
        6 if fuse_linears else 0
    )  # per layer q,k,v -> 1, gate,up -> 1
    torch.testing.assert_close(_prefill_and_decode(graph, ids, caches, fast), expected, rtol=1e-5, atol=1e-5)
