"""Paged cached attention (float64 inputs) against the dense cached op and the canonical op.

Three sequences advance through mixed steps (prompt chunks of different sizes beside one-token decodes,
packed into one row) over a block cache whose blocks are handed out in shuffled order. Each sequence's
outputs must equal those of the dense cached op run on the same chunks, and ``torch_attention`` over
the whole sequence at once (the ops compute the softmax in fp32, hence the tolerance).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

import onboardlm.ops  # noqa: F401
from onboardlm.errors import UnsupportedFeature
from onboardlm.export import causal_lm_dynamic_shapes, torch_export_to_gm
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.transforms import cached_ops, paged_ops
from onboardlm.transforms.kv_cache import insert_cached_attention
from onboardlm.transforms.paged_kv_cache import PAGED_INPUTS, insert_paged_attention, to_paged_attention

ops = torch.ops.auto_deploy
N, N_KV, D, BLOCK = 4, 2, 8, 4
#: Tokens each sequence computes per step (0: not in this step); every sequence ends on decodes.
CHUNKS = ((5, 2, 0), (4, 1, 6), (1, 1, 7), (1, 1, 1), (1, 0, 1))
OPTIONS = {
    "plain": {},
    "window": {"scale": 0.3, "sliding_window": 3, "logit_cap": 1.5},
    "sinks": {},
    "chunked": {"attention_chunk_size": 3},  # Llama 4's chunked local attention, across block borders
}


def _to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``[.., s, n, d]`` -> layout."""
    return x if layout == "bsnd" else x.transpose(-3, -2)


def _from_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "bsnd" else x.transpose(-3, -2)


@pytest.mark.parametrize("layout", ["bsnd", "bnsd"])
@pytest.mark.parametrize("variant", list(OPTIONS))
def test_paged_attention_equals_the_dense_cache_and_full_attention(layout: str, variant: str) -> None:
    options = dict(OPTIONS[variant])
    if variant == "sinks":
        options["sinks"] = torch.randn(N, dtype=torch.float64)
    totals = [sum(step[i] for step in CHUNKS) for i in range(3)]
    q, k, v = ([torch.randn(t, h, D, dtype=torch.float64) for t in totals] for h in (N, N_KV, N_KV))
    pool = torch.randperm(16).tolist()
    tables = [[pool.pop() for _ in range(-(-t // BLOCK))] for t in totals]
    k_paged = torch.zeros(16, BLOCK, N_KV, D, dtype=torch.float64)
    v_paged = torch.zeros_like(k_paged)
    dense = [(torch.zeros(1, 32, N_KV, D, dtype=torch.float64), torch.zeros(1, 32, N_KV, D, dtype=torch.float64)) for _ in totals]  # fmt: skip
    paged_out: list[list[torch.Tensor]] = [[] for _ in totals]
    dense_out: list[list[torch.Tensor]] = [[] for _ in totals]
    done = [0, 0, 0]
    for step in CHUNKS:
        seqs = [i for i, n in enumerate(step) if n]
        spans = [(done[i], done[i] + step[i]) for i in seqs]
        packed = [
            torch.cat([x[i][a:b] for i, (a, b) in zip(seqs, spans, strict=True)])[None] for x in (q, k, v)
        ]
        slots = [tables[i][p // BLOCK] * BLOCK + p % BLOCK for i, (a, b) in zip(seqs, spans, strict=True) for p in range(a, b)]  # fmt: skip
        width = max(len(tables[i]) for i in seqs)
        block_tables = torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i in seqs])
        query_start = torch.tensor([0] + [step[i] for i in seqs]).cumsum(0)
        cached = torch.tensor([a for a, _ in spans])
        out = ops.onboardlm_paged_attention(
            *(_to_layout(x, layout) for x in packed), k_paged, v_paged, torch.tensor(slots), block_tables,
            query_start, cached, True, **options, layout=layout,
        )  # fmt: skip
        out = _from_layout(out, layout)[0]
        for j, (i, (a, b)) in enumerate(zip(seqs, spans, strict=True)):
            paged_out[i].append(out[int(query_start[j]) : int(query_start[j + 1])])
            chunk = [_to_layout(x[i][a:b][None], layout) for x in (q, k, v)]
            one = ops.onboardlm_cached_attention(
                *chunk, *dense[i], torch.tensor([a]), b, True, **options, layout=layout
            )
            dense_out[i].append(_from_layout(one, layout)[0])
            done[i] = b
    for i in range(3):
        got, via_dense = torch.cat(paged_out[i]), torch.cat(dense_out[i])
        full = ops.torch_attention(
            q[i][None], k[i][None], v[i][None], None, 0.0, True, **options, layout="bsnd"
        )
        torch.testing.assert_close(got, via_dense, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got, full[0], rtol=1e-5, atol=1e-5)


def _exported_tiny_llama():
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=50,
    )  # fmt: skip
    model = AutoModelForCausalLMFactory(config).build_model()
    ids = torch.zeros(2, 8, dtype=torch.long)
    kwargs = {"input_ids": ids, "position_ids": torch.arange(8).expand(2, 8)}
    return torch_export_to_gm(model, kwargs=kwargs, dynamic_shapes=causal_lm_dynamic_shapes())


def test_the_transform_swaps_every_cached_attention_for_paged_attention() -> None:
    cached = insert_paged_attention(_exported_tiny_llama())
    targets = [n.target for n in cached.gm.graph.nodes if n.op == "call_function"]
    paged = getattr(ops, paged_ops.PAGED_ATTENTION).default
    assert targets.count(paged) == 2
    assert getattr(ops, cached_ops.CACHED_ATTENTION).default not in targets
    inputs = [n.name for n in cached.gm.graph.nodes if n.op == "placeholder"]
    assert (
        all(name in inputs for name in PAGED_INPUTS) and "input_pos" not in inputs and "kv_len" not in inputs
    )
    assert [c.name for c in cached.caches] == ["k_cache_0", "v_cache_0", "k_cache_1", "v_cache_1"]


def test_cached_mla_is_refused_by_name() -> None:
    cached = insert_cached_attention(_exported_tiny_llama())
    node = next(
        n for n in cached.gm.graph.nodes if n.op == "call_function" and "cached_attention" in str(n.target)
    )
    node.target = getattr(ops, cached_ops.CACHED_MLA).default  # stands in for an MLA model's node
    with pytest.raises(UnsupportedFeature, match="paged KV cache for MLA"):
        to_paged_attention(cached)
