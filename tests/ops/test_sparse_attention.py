"""Lightning-indexer and sparse-MLA ops against float64 math written here and transformers' DeepSeek-V3.2 indexer."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV32Config
from transformers.models.deepseek_v32.modeling_deepseek_v32 import (
    DeepseekV32Indexer,
    DeepseekV32RotaryEmbedding,
)

import onboardlm.ops  # noqa: F401  (registers the ops)
from onboardlm.transforms import cached_ops

OPS = torch.ops.auto_deploy
B, H, D, TOPK = 2, 3, 8, 5
N, NOPE, ROPE, V, RANK = 4, 6, 4, 5, 8


def _indexer_inputs(s_q: int, s_k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, s_q, H, D, generator=generator),
        torch.randn(B, s_k, D, generator=generator),
        torch.randn(B, s_q, H, generator=generator),
    )


def _reference_scores(q, k, w, scale: float) -> torch.Tensor:
    """float64 ``[B, S_q, S_k]`` index scores from the definition, one query, key and head at a time."""
    q, k, w = q.double(), k.double(), w.double()
    out = torch.zeros(B, q.shape[1], k.shape[1], dtype=torch.float64)
    for b in range(B):
        for i in range(q.shape[1]):
            for t in range(k.shape[1]):
                out[b, i, t] = sum(w[b, i, h] * torch.relu(scale * q[b, i, h] @ k[b, t]) for h in range(H))
    return out


@pytest.mark.parametrize(
    ("s_q", "s_k", "causal"), [(12, 12, True), (3, 12, False), (12, 12, False), (4, 4, True)]
)
def test_indexer_matches_float64(s_q: int, s_k: int, causal: bool) -> None:
    """Each query keeps min(topk, allowed keys) allowed keys, none scoring below a key it drops
    (ties, e.g. keys every head's ReLU zeroes, may go either way)."""
    q, k, w = _indexer_inputs(s_q, s_k)
    actual = OPS.torch_lightning_indexer(q, k, w, TOPK, 0.3, causal)
    assert actual.dtype == torch.bool and list(actual.shape) == [B, 1, s_q, s_k]
    scores = _reference_scores(q, k, w, 0.3)
    for b in range(B):
        for i in range(s_q):
            allowed = torch.arange(s_k) <= i if causal and s_q == s_k else torch.ones(s_k, dtype=torch.bool)
            kept, row = actual[b, 0, i], scores[b, i]
            assert not (kept & ~allowed).any()
            assert int(kept.sum()) == min(TOPK, int(allowed.sum()))
            dropped = allowed & ~kept
            if dropped.any():
                assert row[kept].min() >= row[dropped].max() - 1e-9


def test_indexer_default_scale_is_inverse_sqrt_dim() -> None:
    q, k, w = _indexer_inputs(10, 10)
    assert torch.equal(
        OPS.torch_lightning_indexer(q, k, w, TOPK), OPS.torch_lightning_indexer(q, k, w, TOPK, D**-0.5)
    )


def test_indexer_matches_deepseek_v32() -> None:
    """The op, fed what DeepseekV32Indexer computes before scoring, selects the keys transformers selects."""
    config = DeepseekV32Config(
        hidden_size=32, num_attention_heads=4, q_lora_rank=16, qk_rope_head_dim=4, index_n_heads=H,
        index_head_dim=D, index_topk=TOPK, num_hidden_layers=1,
    )  # fmt: skip
    torch.manual_seed(0)
    indexer = DeepseekV32Indexer(config, 0).eval()
    for param in indexer.parameters():
        torch.nn.init.normal_(param, std=0.5)
    seq = 14
    hidden, q_resid = torch.randn(B, seq, 32), torch.randn(B, seq, 16)
    positions = torch.arange(seq)[None].expand(B, seq)
    cos, sin = DeepseekV32RotaryEmbedding(config)(hidden, positions)
    causal = torch.full((seq, seq), torch.finfo(torch.float32).min).triu(1)
    indices = indexer(hidden, q_resid, (cos, sin), causal[None].expand(B, seq, seq), positions)
    expected = torch.zeros(B, seq, seq, dtype=torch.bool).scatter(-1, indices.long(), True)
    expected = (expected & (causal == 0)).unsqueeze(1)

    q = indexer.wq_b(q_resid).view(B, seq, H, D)
    k = indexer.k_norm(indexer.wk(hidden)).view(B, seq, 1, D)
    q_rot, k_rot = OPS.torch_rope_with_explicit_cos_sin(q[..., :4], k[..., :4], cos, sin, 2)
    q, k = torch.cat([q_rot, q[..., 4:]], -1), torch.cat([k_rot, k[..., 4:]], -1)[:, :, 0]
    weights = indexer.weights_proj(hidden).float() * H**-0.5
    with torch.no_grad():
        actual = OPS.torch_lightning_indexer(q, k, weights, TOPK, indexer.softmax_scale, True)
    assert torch.equal(actual, expected)


def _mla_inputs(s: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(B, s, N, NOPE, generator=generator),
        torch.randn(B, s, N, ROPE, generator=generator),
        torch.randn(B, s, RANK, generator=generator),
        torch.randn(B, s, 1, ROPE, generator=generator),
        torch.randn(N * (NOPE + V), RANK, generator=generator) / RANK**0.5,
    )


def _reference_sparse_mla(q_nope, q_pe, ckv, kpe, weight, mask: torch.Tensor) -> torch.Tensor:
    """float64 MLA in bsnd with the causal rule and ``mask`` [B, 1, S, S] (True = allowed)."""
    q_nope, q_pe, ckv, kpe, weight = (x.double() for x in (q_nope, q_pe, ckv, kpe, weight))
    s = q_nope.shape[1]
    kv = (ckv @ weight.T).view(B, s, N, NOPE + V)
    key = torch.cat([kv[..., :NOPE], kpe.expand(B, s, N, ROPE)], dim=-1)
    scores = torch.einsum("bqnd,bknd->bnqk", torch.cat([q_nope, q_pe], -1), key) * (NOPE + ROPE) ** -0.5
    allowed = mask & torch.ones(s, s, dtype=torch.bool).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bnqk,bknd->bqnd", torch.softmax(scores, dim=-1), kv[..., NOPE:])


def test_sparse_mla_matches_float64_and_differs_from_dense() -> None:
    s = 10
    inputs = _mla_inputs(s)
    mask = OPS.torch_lightning_indexer(*_indexer_inputs(s, s, seed=3), 3, None, True)
    actual = OPS.torch_sparse_mla(*inputs, mask)
    torch.testing.assert_close(actual.double(), _reference_sparse_mla(*inputs, mask), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(actual, OPS.torch_mla(*inputs))  # the selection matters
    everything = torch.ones(B, 1, s, s, dtype=torch.bool)
    torch.testing.assert_close(OPS.torch_sparse_mla(*inputs, everything), OPS.torch_mla(*inputs))


def test_sparse_mla_rejects_a_mask_of_another_shape() -> None:
    inputs = _mla_inputs(6)
    with pytest.raises(ValueError, match="index_mask must be bool"):
        OPS.torch_sparse_mla(*inputs, torch.ones(B, 1, 6, 5, dtype=torch.bool))


def test_cached_indexer_steps_equal_one_full_call() -> None:
    """Prefill 7 tokens then decode 5 one at a time: each step's selection over the cache is the row
    of one uncached call over all 12 tokens."""
    s = 12
    q, k, w = _indexer_inputs(s, s, seed=5)
    full = OPS.torch_lightning_indexer(q, k, w, TOPK, None, True)
    cache = torch.zeros(B, 16, D)
    pos = torch.zeros(B, dtype=torch.long)
    step = cached_ops.cached_lightning_indexer(q[:, :7], k[:, :7], w[:, :7], cache, pos, 7, TOPK)
    assert torch.equal(step, full[..., :7, :7])
    for i in range(7, s):
        pos = torch.full((B,), i, dtype=torch.long)
        step = cached_ops.cached_lightning_indexer(
            q[:, i : i + 1], k[:, i : i + 1], w[:, i : i + 1], cache, pos, i + 1, TOPK
        )
        assert torch.equal(step, full[..., i : i + 1, : i + 1])
