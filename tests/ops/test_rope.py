"""RoPE ops against transformers' own functions and float64 rotations written here."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim
from transformers import LlamaConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.llama4.modeling_llama4 import apply_rotary_emb as llama4_apply_rotary_emb

import onboardlm.ops.rope  # noqa: F401  (registers the RoPE ops)

OPS = torch.ops.auto_deploy
B, S, N, N_KV, D = 2, 5, 4, 2, 8
THETA = 10000.0
BF16_TOL = {"rtol": 2e-2, "atol": 2e-2}


def _angles(position_ids: torch.Tensor) -> torch.Tensor:
    """float64 rotation angles ``[B, S, D/2]``: position * theta^(-2i/D)."""
    inv_freq = THETA ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    return position_ids.double()[..., None] * inv_freq


def _positions() -> torch.Tensor:
    return torch.randint(0, 64, (B, S))


def _qk(layout: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if layout == "bnsd":
        return torch.randn(B, N, S, D, dtype=dtype), torch.randn(B, N_KV, S, D, dtype=dtype)
    return torch.randn(B, S, N, D, dtype=dtype), torch.randn(B, S, N_KV, D, dtype=dtype)


def _hf_cos_sin(position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    config = LlamaConfig(
        hidden_size=N * D,
        num_attention_heads=N,
        num_key_value_heads=N_KV,
        head_dim=D,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
    )
    return LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=dtype), position_ids)


def _rotate_pairs_f64(x: torch.Tensor, angles: torch.Tensor, unsqueeze_dim: int, pairs: str) -> torch.Tensor:
    """Rotate channel pairs by ``angles`` in float64; pairs are (i, i+D/2) for "half", (2i, 2i+1) for "adjacent"."""
    x = x.double()
    c, s = angles.cos().unsqueeze(unsqueeze_dim), angles.sin().unsqueeze(unsqueeze_dim)
    if pairs == "half":
        a, b = x[..., : D // 2], x[..., D // 2 :]
        return torch.cat((a * c - b * s, a * s + b * c), dim=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)


def _evens_then_odds(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


UNSQ = pytest.mark.parametrize(("layout", "unsqueeze_dim"), [("bnsd", 1), ("bsnd", 2)])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])


@UNSQ
@DTYPES
def test_explicit_cos_sin_matches_hf(layout: str, unsqueeze_dim: int, dtype: torch.dtype) -> None:
    q, k = _qk(layout, dtype)
    cos, sin = _hf_cos_sin(_positions(), dtype)
    out_q, out_k = OPS.torch_rope_with_explicit_cos_sin(q, k, cos, sin, unsqueeze_dim)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    assert out_q.dtype == dtype and out_k.dtype == dtype
    torch.testing.assert_close(out_q, ref_q)
    torch.testing.assert_close(out_k, ref_k)


@UNSQ
@DTYPES
def test_explicit_cos_sin_matches_float64_rotation(
    layout: str, unsqueeze_dim: int, dtype: torch.dtype
) -> None:
    q, k = _qk(layout, dtype)
    angles = _angles(_positions())
    cos, sin = torch.cat((angles, angles), -1).cos().float(), torch.cat((angles, angles), -1).sin().float()
    out_q, out_k = OPS.torch_rope_with_explicit_cos_sin(q, k, cos, sin, unsqueeze_dim)
    tol = BF16_TOL if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    assert out_q.dtype == dtype, "fp32 cos/sin must be cast to q's dtype"
    torch.testing.assert_close(out_q.double(), _rotate_pairs_f64(q, angles, unsqueeze_dim, "half"), **tol)
    torch.testing.assert_close(out_k.double(), _rotate_pairs_f64(k, angles, unsqueeze_dim, "half"), **tol)


@UNSQ
@DTYPES
def test_complex_freqs_matches_float64_pair_rotation(
    layout: str, unsqueeze_dim: int, dtype: torch.dtype
) -> None:
    q, k = _qk(layout, dtype)
    angles = _angles(_positions())
    freqs_cis = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    out_q, out_k = OPS.torch_rope_with_complex_freqs(q, k, freqs_cis, unsqueeze_dim)
    tol = BF16_TOL if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    assert out_q.dtype == dtype and out_k.dtype == dtype
    torch.testing.assert_close(out_q.double(), _rotate_pairs_f64(q, angles, unsqueeze_dim, "adjacent"), **tol)
    torch.testing.assert_close(out_k.double(), _rotate_pairs_f64(k, angles, unsqueeze_dim, "adjacent"), **tol)


@DTYPES
def test_complex_freqs_matches_llama4(dtype: torch.dtype) -> None:
    q, k = _qk("bsnd", dtype)
    angles = _angles(_positions())
    freqs_cis = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    out_q, out_k = OPS.torch_rope_with_complex_freqs(q, k, freqs_cis)
    ref_q, ref_k = llama4_apply_rotary_emb(q, k, freqs_cis)
    torch.testing.assert_close(out_q, ref_q)
    torch.testing.assert_close(out_k, ref_k)


@UNSQ
def test_complex_freqs_equals_neox_on_permuted_channels(layout: str, unsqueeze_dim: int) -> None:
    q, k = _qk(layout, torch.float32)
    angles = _angles(_positions())
    freqs_cis = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    cos, sin = torch.cat((angles, angles), -1).cos().float(), torch.cat((angles, angles), -1).sin().float()
    out_q, out_k = OPS.torch_rope_with_complex_freqs(q, k, freqs_cis, unsqueeze_dim)
    neox_q, neox_k = OPS.torch_rope_with_explicit_cos_sin(
        _evens_then_odds(q), _evens_then_odds(k), cos, sin, unsqueeze_dim
    )
    torch.testing.assert_close(_evens_then_odds(out_q), neox_q)
    torch.testing.assert_close(_evens_then_odds(out_k), neox_k)


@UNSQ
@DTYPES
def test_qk_interleaving_matches_hf_deepseek(layout: str, unsqueeze_dim: int, dtype: torch.dtype) -> None:
    q, k = _qk(layout, dtype)
    cos, sin = _hf_cos_sin(_positions(), dtype)
    out_q, out_k = OPS.torch_rope_with_qk_interleaving(q, k, cos, sin, unsqueeze_dim)
    ref_q, ref_k = apply_rotary_pos_emb_interleave(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    assert out_q.dtype == dtype and out_k.dtype == dtype
    torch.testing.assert_close(out_q, ref_q)
    torch.testing.assert_close(out_k, ref_k)


@UNSQ
def test_qk_interleaving_is_neox_on_deinterleaved_channels(layout: str, unsqueeze_dim: int) -> None:
    q, k = _qk(layout, torch.float64)
    cos, sin = _hf_cos_sin(_positions(), torch.float64)
    out_q, out_k = OPS.torch_rope_with_qk_interleaving(q, k, cos, sin, unsqueeze_dim)
    ref_q, ref_k = OPS.torch_rope_with_explicit_cos_sin(
        _evens_then_odds(q), _evens_then_odds(k), cos, sin, unsqueeze_dim
    )
    torch.testing.assert_close(out_q, ref_q)
    torch.testing.assert_close(out_k, ref_k)


def test_qk_interleaving_casts_cos_sin_to_q_dtype() -> None:
    q, k = _qk("bnsd", torch.bfloat16)
    cos, sin = _hf_cos_sin(_positions(), torch.float32)
    out_q, out_k = OPS.torch_rope_with_qk_interleaving(q, k, cos, sin)
    assert out_q.dtype == torch.bfloat16 and out_k.dtype == torch.bfloat16


def _cases(dtype: torch.dtype, transposed: bool) -> list[tuple[str, tuple]]:
    """(op name, args) for every RoPE op; ``transposed`` gives non-contiguous bnsd views of bsnd data."""
    q, k = _qk("bsnd", dtype)
    unsq = 2
    if transposed:
        q, k, unsq = q.transpose(1, 2), k.transpose(1, 2), 1
    angles = _angles(_positions())
    cos, sin = torch.cat((angles, angles), -1).cos().float(), torch.cat((angles, angles), -1).sin().float()
    freqs_cis = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    return [
        ("torch_rope_with_explicit_cos_sin", (q, k, cos, sin, unsq)),
        ("torch_rope_with_complex_freqs", (q, k, freqs_cis, unsq)),
        ("torch_rope_with_qk_interleaving", (q, k, cos, sin, unsq)),
    ]


@pytest.mark.parametrize("transposed", [False, True])
@DTYPES
@pytest.mark.parametrize("index", range(3))
def test_opcheck(index: int, dtype: torch.dtype, transposed: bool) -> None:
    name, args = _cases(dtype, transposed)[index]
    torch.library.opcheck(getattr(OPS, name).default, args)


@pytest.mark.parametrize("index", range(3))
def test_fake_matches_real(index: int) -> None:
    name, args = _cases(torch.bfloat16, transposed=True)[index]
    op = getattr(OPS, name)
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
    assert all(
        r.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
        for r, a in zip(real, args[:2], strict=True)
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "torch_rope_with_explicit_cos_sin",
            [("q", None), ("k", None), ("cos", None), ("sin", None), ("unsqueeze_dim", 1)],
        ),
        (
            "torch_rope_with_complex_freqs",
            [("xq", None), ("xk", None), ("freqs_cis", None), ("unsqueeze_dim", 2)],
        ),
        (
            "torch_rope_with_qk_interleaving",
            [("q", None), ("k", None), ("cos", None), ("sin", None), ("unsqueeze_dim", 1)],
        ),
    ],
)
def test_schema_matches_autodeploy(name: str, expected: list[tuple[str, object]]) -> None:
    schema = getattr(OPS, name).default._schema
    assert [(a.name, a.default_value) for a in schema.arguments] == expected
    assert len(schema.returns) == 2


class _RopeBlock(torch.nn.Module):
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, freqs_cis: torch.Tensor
    ):
        q1, k1 = OPS.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 2)
        q2, k2 = OPS.torch_rope_with_complex_freqs(q1, k1, freqs_cis, 2)
        return OPS.torch_rope_with_qk_interleaving(q2, k2, cos, sin, 2)


def _block_inputs(seq: int) -> tuple[torch.Tensor, ...]:
    angles = _angles(torch.arange(seq).expand(B, seq))
    cos, sin = torch.cat((angles, angles), -1).cos().float(), torch.cat((angles, angles), -1).sin().float()
    freqs_cis = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    return torch.randn(B, seq, N, D), torch.randn(B, seq, N_KV, D), cos, sin, freqs_cis


def test_export_with_dynamic_seq() -> None:
    seq = Dim("seq", min=2, max=64)
    shapes = ({1: seq}, {1: seq}, {1: seq}, {1: seq}, {1: seq})
    exported = torch.export.export(_RopeBlock(), _block_inputs(S), dynamic_shapes=shapes)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {f"auto_deploy.{name}.default" for name, _ in _cases(torch.float32, False)} <= targets
    inputs = _block_inputs(S + 6)
    for got, want in zip(exported.module()(*inputs), _RopeBlock()(*inputs), strict=True):
        torch.testing.assert_close(got, want)
