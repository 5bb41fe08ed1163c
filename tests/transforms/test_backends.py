"""The SDPA cached attention computes what the reference cached attention computes, on CPU.

Each case runs the same sequence of calls through both ops, each on its own caches: a right-padded
prefill of three prompts of different lengths, decode steps at per-sequence positions, then a chunk
appended to the filled caches. The fast op's decode reads a longer, fixed ``kv_len`` (the whole cache,
as a CUDA-graph step does); the reference reads exactly what it needs.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from onboardlm.export import causal_lm_dynamic_shapes, torch_export_to_gm
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.transforms import INPUT_POS, KV_LEN, insert_cached_attention
from onboardlm.transforms.backends import use_direct_kernels
from onboardlm.transforms.cached_ops import cached_attention
from onboardlm.transforms.fast_attention import fast_cached_attention, use_fast_attention

MAX_BATCH, MAX_SEQ, HEAD_DIM = 4, 24, 8
LENGTHS = [5, 3, 7]


def _qkv(n_heads: int, n_kv: int, s: int, layout: str) -> tuple[torch.Tensor, ...]:
    b = len(LENGTHS)
    shapes = [(b, n, s, HEAD_DIM) for n in (n_heads, n_kv, n_kv)]
    tensors = [torch.randn(shape, dtype=torch.float64).float() for shape in shapes]
    return tuple(t if layout == "bnsd" else t.transpose(1, 2).contiguous() for t in tensors)


def _caches(n_kv: int) -> list[torch.Tensor]:
    return [torch.zeros(MAX_BATCH, MAX_SEQ, n_kv, HEAD_DIM) for _ in range(2)]


def _compare(n_heads: int, n_kv: int, layout: str, fast_kv_len_for_decode: int | None, **options) -> None:
    fast_caches, ref_caches = _caches(n_kv), _caches(n_kv)
    lengths = torch.tensor(LENGTHS)
    width = max(LENGTHS)

    def check(q, k, v, input_pos: torch.Tensor, kv_len: int, fast_kv_len: int) -> None:
        got = fast_cached_attention(q, k, v, *fast_caches, input_pos, fast_kv_len, layout=layout, **options)
        want = cached_attention(q, k, v, *ref_caches, input_pos, kv_len, layout=layout, **options)
        rows = want if layout == "bnsd" else want.transpose(1, 2)
        valid = torch.arange(q.shape[2 if layout == "bnsd" else 1]) < (lengths - input_pos)[:, None]
        got_rows = got if layout == "bnsd" else got.transpose(1, 2)
        # Padded query rows are garbage by contract (overwritten later): compare the real tokens.
        torch.testing.assert_close(got_rows.transpose(1, 2)[valid], rows.transpose(1, 2)[valid])
        for fast, ref in zip(fast_caches, ref_caches, strict=True):
            torch.testing.assert_close(fast, ref, rtol=0, atol=0)

    check(*_qkv(n_heads, n_kv, width, layout), torch.zeros(3, dtype=torch.long), width, width)
    for step in range(3):
        lengths = lengths + 1
        input_pos = lengths - 1
        kv_len = width + step + 1
        check(*_qkv(n_heads, n_kv, 1, layout), input_pos, kv_len, fast_kv_len_for_decode or kv_len)
    input_pos, lengths = lengths, lengths + 4
    kv_len = int(lengths.max())
    check(*_qkv(n_heads, n_kv, 4, layout), input_pos, kv_len, kv_len)


@pytest.mark.parametrize(("n_heads", "n_kv"), [(4, 4), (6, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("layout", ["bnsd", "bsnd"])
@pytest.mark.parametrize("fast_kv_len", [None, MAX_SEQ], ids=["exact_kv_len", "whole_cache"])
def test_fast_op_equals_the_reference_op(
    n_heads: int, n_kv: int, layout: str, fast_kv_len: int | None
) -> None:
    torch.manual_seed(0)
    _compare(n_heads, n_kv, layout, fast_kv_len)


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("sliding_window", [None, 3])
def test_fast_op_keeps_causal_flag_and_sliding_window(is_causal: bool, sliding_window: int | None) -> None:
    torch.manual_seed(1)
    _compare(6, 2, "bsnd", MAX_SEQ, is_causal=is_causal, sliding_window=sliding_window, scale=0.3)


@pytest.mark.parametrize(
    "options", [{"logit_cap": 5.0}, {"sinks": torch.randn(6)}, {"sinks": torch.randn(6), "sliding_window": 2}]
)
def test_softcap_and_sinks_fall_back_to_the_reference(options: dict) -> None:
    torch.manual_seed(2)
    _compare(6, 2, "bnsd", None, **options)


CONFIG = LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=64,
)  # fmt: skip


@pytest.mark.parametrize("direct_kernels_first", [False, True])
def test_rewritten_graph_gives_the_model_logits(direct_kernels_first: bool) -> None:
    torch.manual_seed(3)
    model = AutoModelForCausalLMFactory(CONFIG).build_model()
    ids = torch.randint(0, CONFIG.vocab_size, (2, 6))
    positions = torch.arange(6).expand(2, 6)
    gm = torch_export_to_gm(
        model, kwargs={"input_ids": ids, "position_ids": positions}, dynamic_shapes=causal_lm_dynamic_shapes()
    )
    graph = insert_cached_attention(gm)
    if direct_kernels_first:
        use_direct_kernels(graph.gm)
    assert use_fast_attention(graph.gm) == CONFIG.num_hidden_layers
    caches = {s.name: torch.zeros(2, 6, *s.features, dtype=s.dtype) for s in graph.caches}
    logits = graph.gm(input_ids=ids, position_ids=positions, **{INPUT_POS: torch.zeros(2, dtype=torch.long)},
                      **{KV_LEN: 6}, **caches)  # fmt: skip
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=positions).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
