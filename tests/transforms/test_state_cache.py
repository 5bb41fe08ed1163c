"""State-cache transform: the canonical stateful ops of an exported hybrid graph become cached state ops.

The dense graph (``onboardlm run``) gets one state cache per stateful node, sized from the export
metadata, and a ``seq_lens`` input; the paged graph (``onboardlm serve``) reads ``state_slots``,
``cached_lens`` and ``query_start`` instead. A graph without stateful ops is left as it was.
"""

from __future__ import annotations

import pytest
import torch

from onboardlm.export import causal_lm_dynamic_shapes, torch_export_to_gm
from onboardlm.testing.hybrid_models import random_model
from onboardlm.transforms import insert_cached_attention
from onboardlm.transforms.paged_kv_cache import to_paged_attention
from onboardlm.transforms.state_cache import SEQ_LENS, STATE_SLOTS, cached_state_nodes, stateful_nodes

CANONICAL = ("torch_causal_conv1d", "torch_ssm", "torch_gated_delta_rule")


def _export(layout: str):
    model = random_model(layout)
    ids = torch.zeros(2, 8, dtype=torch.long)
    kwargs = {"input_ids": ids, "position_ids": torch.arange(8).expand(2, 8)}
    return model, torch_export_to_gm(model, kwargs=kwargs, dynamic_shapes=causal_lm_dynamic_shapes())


def _inputs(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


def _targets(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("layout", ["mamba2", "gated_delta", "hybrid"])
def test_every_stateful_op_gets_a_state_cache_in_the_dense_and_the_paged_graph(layout: str) -> None:
    model, gm = _export(layout)
    config = model.config
    count = len(stateful_nodes(gm.graph))
    assert count == 2 * sum(t != "attention" for t in config.layer_types)  # a conv and a scan per mixer
    cached = insert_cached_attention(gm)
    assert not any(op in t for t in _targets(cached.gm) for op in CANONICAL)
    assert len(cached_state_nodes(cached.gm.graph)) == count
    assert SEQ_LENS in _inputs(cached.gm) and cached.has_state
    states = {spec.name: spec for spec in cached.caches if not spec.per_token}
    assert len(states) == count
    mamba_conv = (
        config.mamba_num_heads * config.mamba_head_dim + 2 * config.mamba_n_groups * config.mamba_state_size
    )
    delta_conv = 2 * config.linear_num_key_heads * config.linear_key_head_dim + (
        config.linear_num_value_heads * config.linear_value_head_dim
    )
    expected = set()
    for kind in (t for t in config.layer_types if t != "attention"):
        if kind == "mamba2":
            expected.add(((config.mamba_conv_kernel - 1, mamba_conv), model.embed_tokens.weight.dtype))
            expected.add(
                ((config.mamba_num_heads, config.mamba_head_dim, config.mamba_state_size), torch.float32)
            )
        else:
            expected.add(((config.linear_conv_kernel - 1, delta_conv), model.embed_tokens.weight.dtype))
            expected.add(
                (
                    (config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim),
                    torch.float32,
                )
            )
    assert {(s.features, s.dtype) for s in states.values()} == expected
    assert any(s.per_token for s in cached.caches) == ("attention" in config.layer_types)

    paged = to_paged_attention(cached)
    names = _inputs(paged.gm)
    assert STATE_SLOTS in names and SEQ_LENS not in names and "input_pos" not in names
    for node in cached_state_nodes(paged.gm.graph):
        slots, input_pos, seq_lens = node.args[-3:]
        assert (slots.name, input_pos.name, seq_lens.target) == (STATE_SLOTS, "cached_lens", torch.diff)


def test_a_graph_without_stateful_ops_keeps_its_inputs() -> None:
    from transformers import LlamaConfig

    from onboardlm.models.factory import AutoModelForCausalLMFactory

    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=40)  # fmt: skip
    model = AutoModelForCausalLMFactory(config).build_model()
    kwargs = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "position_ids": torch.arange(8).expand(2, 8)}
    graph = insert_cached_attention(
        torch_export_to_gm(model, kwargs=kwargs, dynamic_shapes=causal_lm_dynamic_shapes())
    )
    assert SEQ_LENS not in _inputs(graph.gm) and not graph.has_state
    assert STATE_SLOTS not in _inputs(to_paged_attention(graph).gm)


@torch.library.custom_op("auto_deploy::onboardlm_test_new_scan", mutates_args=())
def _new_scan(x: torch.Tensor) -> torch.Tensor:
    return x.cumsum(1)


@_new_scan.register_fake
def _new_scan_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _NewScanLM(torch.nn.Module):
    """A state-space op the transform has no cached version of (one added to ops/ssm.py later)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.ops.auto_deploy.onboardlm_test_new_scan(self.embed(input_ids)))


def test_a_state_space_op_without_a_cached_version_is_refused_by_name(monkeypatch) -> None:
    from onboardlm.errors import UnsupportedFeature
    from onboardlm.ops import DECLARED_OPS

    monkeypatch.setitem(DECLARED_OPS, "onboardlm_test_new_scan", "ssm")
    kwargs = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "position_ids": torch.arange(8).expand(2, 8)}
    gm = torch_export_to_gm(_NewScanLM(), kwargs=kwargs, dynamic_shapes=causal_lm_dynamic_shapes())
    with pytest.raises(UnsupportedFeature, match="onboardlm_test_new_scan state caching"):
        insert_cached_attention(gm)
