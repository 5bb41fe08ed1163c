"""``torch_attention_key_bias`` against float64 math written here and transformers' Doge attention."""

from __future__ import annotations

import pytest
import torch
from transformers import DogeConfig
from transformers.models.doge.modeling_doge import DogeAttention, DogeRotaryEmbedding

import onboardlm.ops  # noqa: F401  (registers the ops)

OPS = torch.ops.auto_deploy
B, H, KV, D = 2, 4, 2, 8


def _inputs(s_q: int, s_k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, s_q, D, generator=generator),
        torch.randn(B, KV, s_k, D, generator=generator),
        torch.randn(B, KV, s_k, D, generator=generator),
        torch.randn(B, KV, s_k, generator=generator),
    )


def _reference(q, k, v, bias, scale: float, causal: bool, keep: int | None) -> torch.Tensor:
    """float64 attention from the definition, one head and query row at a time."""
    q, k, v, bias = q.double(), k.double(), v.double(), bias.double()
    s_q, s_k = q.shape[2], k.shape[2]
    out = torch.zeros(B, H, s_q, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // KV)
            for i in range(s_q):
                allowed = [j for j in range(s_k) if not (causal and s_q == s_k) or j <= i]
                if keep and s_k > keep:  # the keep highest-bias allowed keys
                    allowed = sorted(allowed, key=lambda j: -float(bias[b, g, j]))[:keep]
                scores = torch.stack([scale * q[b, h, i] @ k[b, g, j] + bias[b, g, j] for j in allowed])
                weights = torch.softmax(scores, dim=0)
                out[b, h, i] = sum(w * v[b, g, j] for w, j in zip(weights, allowed, strict=True))
    return out


@pytest.mark.parametrize(
    ("s_q", "s_k", "causal", "keep"),
    [
        (6, 6, True, None),
        (6, 6, True, 3),
        (6, 6, False, 4),
        (2, 7, True, None),
        (5, 5, True, 8),
        (6, 6, True, 0),
    ],
)
def test_matches_float64(s_q: int, s_k: int, causal: bool, keep: int | None) -> None:
    q, k, v, bias = _inputs(s_q, s_k)
    actual = OPS.torch_attention_key_bias(q, k, v, bias, keep, causal, 0.3)
    expected = _reference(q, k, v, bias, 0.3, causal, keep)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)


def test_bsnd_layout_and_default_scale() -> None:
    q, k, v, bias = _inputs(5, 5, seed=1)
    bnsd = OPS.torch_attention_key_bias(q, k, v, bias, None, True, None)
    bsnd = OPS.torch_attention_key_bias(
        *(t.transpose(1, 2) for t in (q, k, v)), bias, None, True, None, layout="bsnd"
    )
    torch.testing.assert_close(bsnd.transpose(1, 2), bnsd)
    torch.testing.assert_close(
        bnsd.double(), _reference(q, k, v, bias, D**-0.5, True, None), rtol=1e-5, atol=1e-5
    )


def test_rejects_a_bias_of_the_query_heads() -> None:
    q, k, v, _ = _inputs(4, 4)
    with pytest.raises(ValueError, match="key_bias"):
        OPS.torch_attention_key_bias(q, k, v, torch.zeros(B, H, 4))


@pytest.mark.parametrize("keep", [2048, 3])
def test_matches_transformers_doge_attention(keep: int) -> None:
    """Doge's dynamic mask (``exp(A * softplus(dt_proj(v)))`` per key, top ``keep_window_size`` keys)
    under a causal mask, through this op."""
    config = DogeConfig(
        hidden_size=32, num_attention_heads=H, num_key_value_heads=KV, head_dim=D, keep_window_size=keep
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    attn = DogeAttention(config, 0).eval()
    with torch.no_grad():
        attn.A.normal_()
    x = torch.randn(B, 6, 32)
    positions = torch.arange(6)[None].expand(B, -1)
    cos, sin = DogeRotaryEmbedding(config)(x, positions)
    mask = torch.full((6, 6), torch.finfo(x.dtype).min).triu(1)[None, None].expand(B, 1, 6, 6)
    with torch.no_grad():
        expected = attn(x, (cos, sin), attention_mask=mask)[0]
        q = attn.q_norm(attn.q_proj(x).view(B, 6, H, D))
        k = attn.k_norm(attn.k_proj(x).view(B, 6, KV, D))
        v = attn.v_proj(x)
        half = D // 2

        def rotate(t: torch.Tensor) -> torch.Tensor:
            return t * cos[:, :, None] + torch.cat((-t[..., half:], t[..., :half]), -1) * sin[:, :, None]

        bias = torch.exp(attn.A * torch.nn.functional.softplus(attn.dt_proj(v))).transpose(1, 2)
        out = OPS.torch_attention_key_bias(
            rotate(q), rotate(k), v.view(B, 6, KV, D), bias, keep, True, attn.scaling, "bsnd"
        )
        actual = attn.o_proj(out.reshape(B, 6, -1))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
