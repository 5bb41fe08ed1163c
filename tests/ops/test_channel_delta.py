"""torch_channel_gated_delta_rule (Kimi Delta Attention: a decay per key channel) against a float64
recurrence written here and transformers' Kimi-Linear code."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import onboardlm.ops.ssm  # noqa: F401  (registers the state-space ops)

OPS = torch.ops.auto_deploy
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
FP32_TOL = {"rtol": 1e-4, "atol": 1e-4}


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else FP32_TOL


def _inputs(
    seq_len: int, k_heads: int, v_heads: int, dtype: torch.dtype, strength: float = 1.0
) -> tuple[torch.Tensor, ...]:
    """q, k, v, g, beta as Kimi Delta Attention feeds them: g = -exp(A_log) * softplus(f + dt_bias)."""
    batch, k_dim, v_dim = 2, 4, 3
    f = torch.randn(batch, seq_len, v_heads, k_dim)
    A_log = torch.log(torch.empty(v_heads, 1).uniform_(0.01, 16)) + torch.log(torch.tensor(strength))
    g = -A_log.exp() * F.softplus(f + torch.randn(v_heads, k_dim))
    return (
        torch.randn(batch, seq_len, k_heads, k_dim, dtype=dtype),
        torch.randn(batch, seq_len, k_heads, k_dim, dtype=dtype),
        torch.randn(batch, seq_len, v_heads, v_dim, dtype=dtype),
        g.to(dtype),
        torch.rand(batch, seq_len, v_heads, dtype=dtype),
    )


def _f64(q, k, v, g, beta, scale: float | None = None) -> torch.Tensor:
    """Token by token in float64: S_t = diag(e^g_t) S_{t-1} + k_t beta_t (v_t - (diag(e^g_t) S_{t-1})^T k_t)^T."""
    q, k, v, g, beta = (t.double() for t in (q, k, v, g, beta))
    repeats = v.shape[2] // q.shape[2]
    q, k = (
        (t * torch.rsqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6)).repeat_interleave(repeats, dim=2)
        for t in (q, k)
    )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state = torch.zeros(v.shape[0], v.shape[2], q.shape[-1], v.shape[-1], dtype=torch.float64)
    outs = []
    for t in range(v.shape[1]):
        state = state * g[:, t, :, :, None].exp()
        error = v[:, t] - torch.einsum("bhkv,bhk->bhv", state, k[:, t])
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * error)
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("seq_len", [1, 9, 16, 37])  # the op scans chunks of 16
@pytest.mark.parametrize(("k_heads", "v_heads"), [(2, 2), (1, 3)])
@DTYPES
def test_matches_sequential_float64(dtype: torch.dtype, k_heads: int, v_heads: int, seq_len: int) -> None:
    inputs = _inputs(seq_len, k_heads, v_heads, dtype)
    out = OPS.torch_channel_gated_delta_rule(*inputs)
    assert out.dtype == dtype and out.shape == inputs[2].shape
    torch.testing.assert_close(out.double(), _f64(*inputs), **_tol(dtype))


def test_slow_and_strong_decays() -> None:
    """Slow decays carry the first chunk's writes through later chunks; decays of e^-1000 per step
    (a naive exp(-cumsum) factorisation overflows) stay finite; beta up to 2 (negative eigenvalues)."""
    q, k, v, _, beta = _inputs(50, 1, 2, torch.float32)
    for g in (torch.full((2, 50, 2, 4), -1e-3), torch.full((2, 50, 2, 4), -1000.0)):
        out = OPS.torch_channel_gated_delta_rule(q, k, v, g, 2 * beta)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), _f64(q, k, v, g, 2 * beta), **FP32_TOL)


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_scale(scale: float) -> None:
    inputs = _inputs(9, 2, 2, torch.float32)
    out = OPS.torch_channel_gated_delta_rule(*inputs, scale)
    torch.testing.assert_close(out.double(), _f64(*inputs, scale), **FP32_TOL)


@pytest.mark.skipif(
    importlib.util.find_spec("transformers.models.kimi_linear") is None,
    reason="no kimi_linear in transformers",
)
@pytest.mark.parametrize("seq_len", [9, 70])
def test_matches_kimi_linear(seq_len: int) -> None:
    from transformers.models.kimi_linear.modeling_kimi_linear import (
        chunk_kimi_delta_attention,
        recurrent_kimi_delta_attention,
    )

    q, k, v, g, beta = _inputs(seq_len, 2, 2, torch.float32)
    out = OPS.torch_channel_gated_delta_rule(q, k, v, g, beta)
    for reference in (chunk_kimi_delta_attention, recurrent_kimi_delta_attention):
        expected, _ = reference(
            q,
            k,
            v,
            g=g,
            beta=beta,
            initial_state=None,
            output_final_state=False,
            use_qk_l2norm_in_kernel=True,
        )
        torch.testing.assert_close(out, expected, **FP32_TOL)


@pytest.mark.parametrize(
    ("v_heads", "g_shape", "layer_type", "argument"),
    [
        (3, None, "unknown", "heads"),
        (2, (2, 5, 2), "unknown", "g must be"),
        (2, None, "linear", "layer_type"),
    ],
)
def test_rejects_bad_arguments(
    v_heads: int, g_shape: tuple[int, ...] | None, layer_type: str, argument: str
) -> None:
    q, k, v, g, beta = _inputs(5, 2, v_heads, torch.float32)
    if g_shape is not None:
        g = torch.zeros(g_shape)
    with pytest.raises(ValueError, match=argument):
        OPS.torch_channel_gated_delta_rule(q, k, v, g, beta, layer_type=layer_type)


def test_opcheck_and_export() -> None:
    inputs = _inputs(9, 2, 2, torch.float32)
    torch.library.opcheck(OPS.torch_channel_gated_delta_rule.default, inputs)

    class Mixer(torch.nn.Module):
        def forward(self, q, k, v, g, beta):
            return OPS.torch_channel_gated_delta_rule(q, k, v, g, beta, shardable=True, layer_type="delta")

    seq = torch.export.Dim("seq", min=2, max=128)
    batch = torch.export.Dim("batch", min=1, max=8)
    shapes = [{0: batch, 1: seq}] * 5
    program = torch.export.export(Mixer(), inputs, dynamic_shapes=shapes)
    longer = _inputs(33, 2, 2, torch.float32)
    torch.testing.assert_close(program.module()(*longer), OPS.torch_channel_gated_delta_rule(*longer))
