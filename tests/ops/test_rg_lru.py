"""torch_rg_lru (Griffin's real-gated linear recurrent unit) against a float64 loop written here and
transformers' RecurrentGemmaRglru module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import onboardlm.ops.ssm  # noqa: F401  (registers the state-space ops)

OPS = torch.ops.auto_deploy
HEADS, BLOCK = 2, 4


def _params(heads: int = HEADS, block: int = BLOCK, strength: float = 1.0) -> list[torch.Tensor]:
    """Gate weights [H, D, D], biases [H, D] and Λ [C] (softplus(Λ) up to about 3 * strength)."""
    return [
        torch.randn(heads, block, block) / block**0.5,
        torch.randn(heads, block),
        torch.randn(heads, block, block) / block**0.5,
        torch.randn(heads, block),
        torch.empty(heads * block).uniform_(-4, 3) * strength,
    ]


def _f64(x: torch.Tensor, params: list[torch.Tensor], gate_scale: float = 8.0) -> torch.Tensor:
    """Token by token in float64, each head's gates a [D, D] matrix product of that head's channels."""
    w_i, b_i, w_a, b_a, lam = (t.double() for t in params)
    x = x.double()
    heads, block = w_i.shape[:2]
    state = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.float64)
    outs = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        gate_i = torch.cat(
            [torch.sigmoid(xt[:, h * block : (h + 1) * block] @ w_i[h] + b_i[h]) for h in range(heads)], -1
        )
        gate_a = torch.cat(
            [torch.sigmoid(xt[:, h * block : (h + 1) * block] @ w_a[h] + b_a[h]) for h in range(heads)], -1
        )
        a = torch.exp(-gate_scale * gate_a * F.softplus(lam))
        norm = torch.ones_like(a) if t == 0 else torch.sqrt(1 - a**2)
        state = a * state + norm * gate_i * xt
        outs.append(state)
    return torch.stack(outs, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_len", [1, 5, 16, 37])
def test_matches_float64_loop(dtype: torch.dtype, seq_len: int) -> None:
    x, params = torch.randn(3, seq_len, HEADS * BLOCK), _params()
    out = OPS.torch_rg_lru(x.to(dtype), *(p.to(dtype) for p in params))
    assert out.dtype == dtype
    expected = _f64(x.to(dtype), [p.to(dtype) for p in params])
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out.double(), expected, **tol)


@pytest.mark.parametrize("strength", [0.01, 30.0])
def test_slow_and_strong_decays(strength: float) -> None:
    """Λ near -inf (a ≈ 1) and large (a ≈ 0, log a down to about -700 over a chunk) stay finite and exact."""
    x, params = torch.randn(2, 40, HEADS * BLOCK), _params(strength=strength)
    out = OPS.torch_rg_lru(x, *params, gate_scale=8.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _f64(x, params), rtol=1e-5, atol=1e-5)


def test_gate_scale() -> None:
    x, params = torch.randn(2, 9, HEADS * BLOCK), _params()
    out = OPS.torch_rg_lru(x, *params, gate_scale=3.0)
    torch.testing.assert_close(out.double(), _f64(x, params, gate_scale=3.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq_len", [1, 7, 20])
def test_matches_recurrent_gemma_rglru(seq_len: int) -> None:
    modeling = pytest.importorskip("transformers.models.recurrent_gemma.modeling_recurrent_gemma")
    from transformers import RecurrentGemmaConfig

    config = RecurrentGemmaConfig(hidden_size=16, lru_width=16, num_attention_heads=4)
    module = modeling.RecurrentGemmaRglru(config).double()
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn_like(param) / 2)
    x = torch.randn(2, seq_len, 16, dtype=torch.float64)
    position_ids = torch.arange(seq_len)[None].expand(2, -1)
    with torch.no_grad():
        expected = module(x, position_ids)
        params = [
            module.input_gate_weight, module.input_gate_bias,
            module.recurrent_gate_weight, module.recurrent_gate_bias, module.recurrent_param,
        ]  # fmt: skip
        out = OPS.torch_rg_lru(x, *params)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        ("x", "x must be"),
        ("input_gate_bias", "input_gate_bias must be"),
        ("recurrent_param", "recurrent_param must be"),
        ("layer_type", "layer_type"),
    ],
)
def test_rejects_bad_arguments(change: str, argument: str) -> None:
    x, params, layer_type = torch.randn(2, 5, HEADS * BLOCK), _params(), "ssm"
    if change == "x":
        x = torch.randn(2, 5, HEADS * BLOCK + 1)
    elif change == "input_gate_bias":
        params[1] = torch.randn(HEADS, BLOCK + 1)
    elif change == "recurrent_param":
        params[4] = torch.randn(HEADS)
    else:
        layer_type = "linear"
    with pytest.raises(ValueError, match=argument):
        OPS.torch_rg_lru(x, *params, layer_type=layer_type)


def test_opcheck_and_export() -> None:
    x, params = torch.randn(2, 9, HEADS * BLOCK), _params()
    torch.library.opcheck(OPS.torch_rg_lru.default, (x, *params))

    class Mixer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.params = torch.nn.ParameterList(params)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return OPS.torch_rg_lru(x, *self.params, shardable=True, layer_type="ssm")

    seq = torch.export.Dim("seq", min=2, max=128)
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(Mixer(), (x,), dynamic_shapes=({0: batch, 1: seq},))
    longer = torch.randn(3, 33, HEADS * BLOCK)
    torch.testing.assert_close(program.module()(longer), OPS.torch_rg_lru(longer, *params))
