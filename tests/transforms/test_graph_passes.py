"""The logit gather and the direct-kernel backend change where and how logits are computed, not their values."""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from onboardlm.export import causal_lm_dynamic_shapes, torch_export_to_gm
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.transforms import INPUT_POS, KV_LEN, LOGIT_INDEX, insert_cached_attention, insert_logit_gather
from onboardlm.transforms.backends import use_direct_kernels

CONFIG = LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=64,
)  # fmt: skip
BATCH, SEQ = 3, 7


def _model_and_cached_graph():
    model = AutoModelForCausalLMFactory(CONFIG).build_model()
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    gm = torch_export_to_gm(
        model, kwargs={"input_ids": ids, "position_ids": positions}, dynamic_shapes=causal_lm_dynamic_shapes()
    )
    return model, insert_cached_attention(gm), ids, positions


def _inputs(graph, ids: torch.Tensor, positions: torch.Tensor) -> dict:
    caches = {s.name: torch.zeros(BATCH, SEQ, *s.features, dtype=s.dtype) for s in graph.caches}
    return {"input_ids": ids, "position_ids": positions, INPUT_POS: torch.zeros(BATCH, dtype=torch.long),
            KV_LEN: SEQ, **caches}  # fmt: skip


def test_logit_gather_keeps_one_position_per_sequence() -> None:
    model, graph, ids, positions = _model_and_cached_graph()
    insert_logit_gather(graph.gm)
    index = torch.tensor([6, 0, 3])
    logits = graph.gm(**_inputs(graph, ids, positions), **{LOGIT_INDEX: index})
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=positions).logits
    assert logits.shape == (BATCH, 1, CONFIG.vocab_size)
    torch.testing.assert_close(logits[:, 0], expected[torch.arange(BATCH), index], rtol=1e-5, atol=1e-5)


def test_direct_kernels_give_the_same_logits_without_dispatching_canonical_ops() -> None:
    _, graph, ids, positions = _model_and_cached_graph()
    before = graph.gm(**_inputs(graph, ids, positions))
    changed = use_direct_kernels(graph.gm)
    after = graph.gm(**_inputs(graph, ids, positions))
    assert changed > 0
    remaining = [
        n for n in graph.gm.graph.nodes if n.op == "call_function" and "auto_deploy" in str(n.target)
    ]
    assert remaining == []
    assert torch.equal(before, after)
