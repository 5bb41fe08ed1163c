"""Cached attention ops against the canonical ops run on the whole sequence at once.

The ops compute the softmax in fp32, hence the tolerance on float64 inputs. Prefill a batch of sequences of different lengths into the cache, then decode token by token; every
query's output must equal the canonical op's output for that sequence alone (``torch_attention`` /
``torch_mla`` with causal masking over all tokens so far).
"""

from __future__ import annotations

import pytest
import torch

import onboardlm.ops  # noqa: F401
from onboardlm.transforms.cached_ops import allowed_keys

ops = torch.ops.auto_deploy
LENGTHS = (5, 2, 7)
DECODE = 3
B, N, N_KV, D = len(LENGTHS), 4, 2, 8


def _right_padded(seqs: list[torch.Tensor]) -> torch.Tensor:
    width = max(s.shape[0] for s in seqs)
    return torch.stack([torch.cat([s, s.new_zeros(width - s.shape[0], *s.shape[1:])]) for s in seqs])


@pytest.mark.parametrize("variant", ["window", "chunked"])
@pytest.mark.parametrize("layout", ["bsnd", "bnsd"])
def test_cached_attention_matches_full_attention_per_sequence(layout: str, variant: str) -> None:
    total = [n + DECODE for n in LENGTHS]
    q, k, v = ([torch.randn(t, heads, D, dtype=torch.float64) for t in total] for heads in (N, N_KV, N_KV))
    sinks = torch.randn(N, dtype=torch.float64)
    options = {"scale": 0.3, "sinks": sinks, "sliding_window": 3, "logit_cap": 1.5}
    if variant == "chunked":  # Llama 4's chunked local attention: prefill and decode cross chunk borders
        options = {"scale": 0.3, "attention_chunk_size": 3}

    def to_layout(x: torch.Tensor) -> torch.Tensor:
        return x if layout == "bsnd" else x.transpose(1, 2)

    k_cache = torch.zeros(4, 16, N_KV, D, dtype=torch.float64)
    v_cache = torch.zeros_like(k_cache)
    outputs: list[list[torch.Tensor]] = [[] for _ in LENGTHS]
    steps = [(torch.zeros(B, dtype=torch.long), list(LENGTHS))]
    steps += [(torch.tensor(LENGTHS) + i, [1] * B) for i in range(DECODE)]
    for input_pos, widths in steps:
        chunk = [
            [x[int(p) : int(p) + w] for x, p, w in zip(xs, input_pos, widths, strict=True)]
            for xs in (q, k, v)
        ]
        qc, kc, vc = (to_layout(_right_padded(c)) for c in chunk)
        kv_len = int((input_pos + max(widths)).max())
        out = ops.onboardlm_cached_attention(
            qc, kc, vc, k_cache, v_cache, input_pos, kv_len, True, **options, layout=layout
        )
        out = out if layout == "bsnd" else out.transpose(1, 2)
        for row, width in enumerate(widths):
            outputs[row].append(out[row, :width])
    for row in range(B):
        expected = ops.torch_attention(
            q[row][None], k[row][None], v[row][None], None, 0.0, True, **options, layout="bsnd"
        )
        torch.testing.assert_close(torch.cat(outputs[row])[None], expected, rtol=1e-5, atol=1e-5)


def test_cached_mla_matches_full_mla_per_sequence() -> None:
    nope, rope, v_dim, rank = 8, 4, 6, 12
    total = [n + DECODE for n in LENGTHS]
    q_nope = [torch.randn(t, N, nope, dtype=torch.float64) for t in total]
    q_pe = [torch.randn(t, N, rope, dtype=torch.float64) for t in total]
    ckv = [torch.randn(t, rank, dtype=torch.float64) for t in total]
    kpe = [torch.randn(t, 1, rope, dtype=torch.float64) for t in total]
    weight = torch.randn(N * (nope + v_dim), rank, dtype=torch.float64)
    ckv_cache = torch.zeros(4, 16, rank, dtype=torch.float64)
    kpe_cache = torch.zeros(4, 16, 1, rope, dtype=torch.float64)
    outputs: list[list[torch.Tensor]] = [[] for _ in LENGTHS]
    steps = [(torch.zeros(B, dtype=torch.long), list(LENGTHS))]
    steps += [(torch.tensor(LENGTHS) + i, [1] * B) for i in range(DECODE)]
    for input_pos, widths in steps:
        parts = [
            _right_padded([x[int(p) : int(p) + w] for x, p, w in zip(xs, input_pos, widths, strict=True)])
            for xs in (q_nope, q_pe, ckv, kpe)
        ]
        kv_len = int((input_pos + max(widths)).max())
        out = ops.onboardlm_cached_mla(
            *parts, weight, ckv_cache, kpe_cache, input_pos, kv_len, True, 0.25, "bsnd"
        )
        for row, width in enumerate(widths):
            outputs[row].append(out[row, :width])
    for row in range(B):
        expected = ops.torch_mla(
            q_nope[row][None], q_pe[row][None], ckv[row][None], kpe[row][None], weight, True, 0.25, "bsnd"
        )
        torch.testing.assert_close(torch.cat(outputs[row])[None], expected, rtol=1e-5, atol=1e-5)


def test_allowed_keys_follow_absolute_positions() -> None:
    mask = allowed_keys(torch.tensor([0, 3]), s_q=2, kv_len=5, is_causal=True, sliding_window=2)
    assert mask.shape == (2, 1, 2, 5)
    assert mask[0, 0].tolist() == [[True, False, False, False, False], [True, True, False, False, False]]
    assert mask[1, 0].tolist() == [[False, False, True, True, False], [False, False, False, True, True]]
    full = allowed_keys(torch.tensor([1]), s_q=2, kv_len=4, is_causal=False, sliding_window=None)
    assert full[0, 0].tolist() == [[True, True, True, False]] * 2


def test_chunked_attention_keeps_each_query_in_its_chunk() -> None:
    """Keys of the query's own chunk of positions only, causal within it (Llama 4's chunked mask)."""
    q, k, v = (torch.randn(1, 7, 2, 4, dtype=torch.float64) for _ in range(3))
    out = ops.torch_attention(q, k, v, None, 0.0, True, None, layout="bsnd", attention_chunk_size=3)
    for position in range(7):
        start = position - position % 3
        expected = ops.torch_attention(
            q[:, position : position + 1],
            k[:, start : position + 1],
            v[:, start : position + 1],
            layout="bsnd",
        )
        torch.testing.assert_close(out[:, position : position + 1], expected)
    mask = allowed_keys(torch.tensor([4]), 2, 6, True, None, attention_chunk_size=3)
    assert mask[0, 0].tolist() == [
        [False, False, False, True, True, False],
        [False, False, False, True, True, True],
    ]
