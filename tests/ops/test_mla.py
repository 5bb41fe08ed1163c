"""MLA op against float64 math written here and transformers' DeepSeek-V3 attention."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
)

import onboardlm.ops.mla  # noqa: F401  (registers torch_mla)

OPS = torch.ops.auto_deploy
B, N, NOPE, ROPE, V, RANK = 2, 4, 6, 4, 5, 8
LAYOUTS = pytest.mark.parametrize("layout", ["bsnd", "bnsd"])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 3e-2, "atol": 3e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}


def _inputs(s_q: int, s_k: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """bsnd ``q_nope, q_pe, compressed_kv, kpe, kv_b_proj_weight``."""
    return (
        torch.randn(B, s_q, N, NOPE, dtype=dtype),
        torch.randn(B, s_q, N, ROPE, dtype=dtype),
        torch.randn(B, s_k, RANK, dtype=dtype),
        torch.randn(B, s_k, 1, ROPE, dtype=dtype),
        (torch.randn(N * (NOPE + V), RANK) / RANK**0.5).to(dtype),
    )


def _to(layout: str, *xs: torch.Tensor) -> list[torch.Tensor]:
    """4-D bsnd tensors as views in ``layout``."""
    return [x if layout == "bsnd" else x.transpose(1, 2) for x in xs]


def _layout_args(layout: str, q_nope, q_pe, compressed_kv, kpe, weight) -> tuple[torch.Tensor, ...]:
    q_nope, q_pe, kpe = _to(layout, q_nope, q_pe, kpe)
    return q_nope, q_pe, compressed_kv, kpe, weight


def _reference(q_nope, q_pe, compressed_kv, kpe, weight, causal: bool, scale: float | None = None):
    """float64 MLA in bsnd from the spec: per-head expansion, cat, one softmax; ``[B, S, N, V]``."""
    q_nope, q_pe, compressed_kv, kpe, weight = (
        x.double() for x in (q_nope, q_pe, compressed_kv, kpe, weight)
    )
    s_q, s_k = q_nope.shape[1], compressed_kv.shape[1]
    kv = (compressed_kv @ weight.T).view(B, s_k, N, NOPE + V)
    key = torch.cat([kv[..., :NOPE], kpe.expand(B, s_k, N, ROPE)], dim=-1)
    query = torch.cat([q_nope, q_pe], dim=-1)
    scores = torch.einsum("bqnd,bknd->bnqk", query, key) * (scale or (NOPE + ROPE) ** -0.5)
    if causal and s_q == s_k:
        scores = scores.masked_fill(torch.ones(s_q, s_k, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bnqk,bknd->bqnd", torch.softmax(scores, dim=-1), kv[..., NOPE:])


@pytest.mark.parametrize(
    ("s_q", "s_k", "is_causal", "scale"),
    [(5, 5, True, None), (5, 5, False, None), (2, 6, True, None), (5, 5, True, 0.7)],
    ids=["causal", "bidirectional", "causal_ignored_when_s_q_ne_s_k", "scale"],
)
@LAYOUTS
@DTYPES
def test_matches_float64(
    s_q: int, s_k: int, is_causal: bool, scale: float | None, layout: str, dtype: torch.dtype
) -> None:
    args = _inputs(s_q, s_k, dtype)
    out = OPS.torch_mla(*_layout_args(layout, *args), is_causal=is_causal, scale=scale, layout=layout)
    assert out.dtype == dtype and out.is_contiguous()
    (out,) = _to(layout, out)  # back to bsnd
    assert out.shape == (B, s_q, N, V)
    torch.testing.assert_close(out.double(), _reference(*args, is_causal, scale), **_tol(dtype))


@pytest.mark.parametrize(("enable_sharding", "layer_type"), [(True, "mla"), (False, "unknown")])
def test_sharding_hints_change_nothing(enable_sharding: bool, layer_type: str) -> None:
    args = _inputs(4, 4)
    hinted = OPS.torch_mla(*args, enable_sharding=enable_sharding, layer_type=layer_type)
    assert torch.equal(hinted, OPS.torch_mla(*args))


# --- transformers' DeepSeek-V3 attention -----------------------------------------------------------


def _deepseek_config(rope_interleave: bool, q_lora_rank: int | None, yarn: bool) -> DeepseekV3Config:
    config = DeepseekV3Config(
        vocab_size=64,
        hidden_size=32,
        num_attention_heads=N,
        num_key_value_heads=N,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=RANK,
        qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE,
        v_head_dim=V,
        num_hidden_layers=1,
        rope_interleave=rope_interleave,
        max_position_embeddings=64,
    )
    if yarn:  # changes the softmax scale through mscale_all_dim
        config.rope_parameters = {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    config._attn_implementation = "eager"
    return config


def _randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5 + (param.dim() == 1))


def _rope_bsnd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """NeoX RoPE on ``[B, S, H, D]``; interleaved channel pairs are first gathered evens-then-odds."""
    if interleaved:
        x = x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.unsqueeze(2) + torch.cat([-x2, x1], dim=-1) * sin.unsqueeze(2)


def _lean_mla(
    hf: DeepseekV3Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str
) -> torch.Tensor:
    """DeepSeek-V3 attention rebuilt on ``torch_mla``, reusing the HF module's weights."""
    b, s, _ = x.shape
    interleaved = hf.config.rope_interleave
    q = hf.q_proj(x) if hf.q_lora_rank is None else hf.q_b_proj(hf.q_a_layernorm(hf.q_a_proj(x)))
    q_nope, q_pe = q.view(b, s, N, NOPE + ROPE).split([NOPE, ROPE], dim=-1)
    compressed_kv, k_pe = hf.kv_a_proj_with_mqa(x).split([RANK, ROPE], dim=-1)
    q_pe = _rope_bsnd(q_pe, cos, sin, interleaved)
    kpe = _rope_bsnd(k_pe.view(b, s, 1, ROPE), cos, sin, interleaved)
    scale = None if hf.scaling == (NOPE + ROPE) ** -0.5 else hf.scaling
    out = OPS.torch_mla(
        *_layout_args(layout, q_nope, q_pe, hf.kv_a_layernorm(compressed_kv), kpe, hf.kv_b_proj.weight),
        is_causal=True,
        scale=scale,
        layout=layout,
    )
    (out,) = _to(layout, out)
    return hf.o_proj(out.reshape(b, s, N * V))


@pytest.mark.parametrize(
    ("rope_interleave", "q_lora_rank", "yarn"),
    [(True, 16, False), (False, 16, False), (True, None, True)],
    ids=["interleaved", "plain_rope", "no_q_lora_yarn_scale"],
)
@LAYOUTS
@DTYPES
def test_matches_deepseek_v3_attention(
    rope_interleave: bool, q_lora_rank: int | None, yarn: bool, layout: str, dtype: torch.dtype
) -> None:
    config = _deepseek_config(rope_interleave, q_lora_rank, yarn)
    hf = DeepseekV3Attention(config, layer_idx=0)
    _randomise(hf)
    hf = hf.to(dtype).eval()
    s = 6
    x = torch.randn(B, s, config.hidden_size, dtype=dtype)
    cos, sin = DeepseekV3RotaryEmbedding(config)(x, torch.arange(s).expand(B, s))
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    mask = torch.zeros(B, 1, s, s, dtype=dtype).masked_fill(~causal, torch.finfo(dtype).min)
    with torch.no_grad():
        expected, _ = hf(x, (cos, sin), mask)
        out = _lean_mla(hf, x, cos, sin, layout)
    assert (hf.scaling != (NOPE + ROPE) ** -0.5) == yarn
    torch.testing.assert_close(out, expected, **_tol(dtype))


# --- bad arguments ---------------------------------------------------------------------------------


def _bad_cases() -> list[tuple[str, tuple, dict, str]]:
    q_nope, q_pe, ckv, kpe, weight = _inputs(3, 3)
    return [
        ("layout", (q_nope, q_pe, ckv, kpe, weight), {"layout": "sbnd"}, "layout"),
        ("layer_type", (q_nope, q_pe, ckv, kpe, weight), {"layer_type": "attention"}, "layer_type"),
        ("q_nope_rank", (q_nope[0], q_pe, ckv, kpe, weight), {}, "q_nope"),
        ("q_pe_heads", (q_nope, q_pe[:, :, :2], ckv, kpe, weight), {}, "q_pe"),
        ("compressed_kv_rank", (q_nope, q_pe, ckv.unsqueeze(2), kpe, weight), {}, "compressed_kv"),
        ("kpe_heads", (q_nope, q_pe, ckv, kpe.expand(B, 3, N, ROPE), weight), {}, "kpe"),
        ("kpe_rope_dim", (q_nope, q_pe, ckv, kpe[..., :2], weight), {}, "kpe"),
        ("weight_rank", (q_nope, q_pe, ckv, kpe, weight[:, :4]), {}, "kv_b_proj_weight"),
        ("weight_heads", (q_nope, q_pe, ckv, kpe, weight[:-1]), {}, "kv_b_proj_weight"),
        ("weight_no_value", (q_nope, q_pe, ckv, kpe, weight[: N * NOPE]), {}, "kv_b_proj_weight"),
    ]


@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
@pytest.mark.parametrize("index", range(len(_bad_cases())), ids=[c[0] for c in _bad_cases()])
def test_rejects_bad_arguments(index: int, fake: bool) -> None:
    _, args, kwargs, argument = _bad_cases()[index]
    with pytest.raises(ValueError, match=argument):
        if fake:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                OPS.torch_mla(*(mode.from_tensor(a) for a in args), **kwargs)
        else:
            OPS.torch_mla(*args, **kwargs)


# --- registration: opcheck, fake kernel, aliasing, schema, export -----------------------------------


def _op_cases() -> list[tuple[tuple, dict]]:
    return [
        (_inputs(4, 4), {}),
        (_layout_args("bnsd", *_inputs(4, 4)), {"layout": "bnsd", "scale": 0.3}),
        (_inputs(2, 5, torch.bfloat16), {"is_causal": False, "enable_sharding": True}),
    ]


CASES = pytest.mark.parametrize("index", range(len(_op_cases())))


@CASES
def test_opcheck(index: int) -> None:
    args, kwargs = _op_cases()[index]
    torch.library.opcheck(OPS.torch_mla.default, args, kwargs)


@CASES
def test_fake_matches_real_and_no_alias(index: int) -> None:
    args, kwargs = _op_cases()[index]
    real = OPS.torch_mla(*args, **kwargs)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = OPS.torch_mla(*(mode.from_tensor(a) for a in args), **kwargs)
    assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())
    assert all(real.untyped_storage().data_ptr() != a.untyped_storage().data_ptr() for a in args)


def test_schema_matches_autodeploy() -> None:
    schema = OPS.torch_mla.default._schema
    assert [(a.name, a.default_value) for a in schema.arguments] == [
        ("q_nope", None),
        ("q_pe", None),
        ("compressed_kv", None),
        ("kpe", None),
        ("kv_b_proj_weight", None),
        ("is_causal", True),
        ("scale", None),
        ("layout", "bsnd"),
        ("enable_sharding", False),
        ("layer_type", "mla"),
    ]


class _MLABlock(torch.nn.Module):
    """Projections into the MLA op as a DeepSeek model file calls it (RoPE left out)."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.q = torch.nn.Linear(hidden, N * (NOPE + ROPE))
        self.kv_a = torch.nn.Linear(hidden, RANK + ROPE)
        self.kv_b = torch.nn.Linear(RANK, N * (NOPE + V), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q_nope, q_pe = self.q(x).view(b, s, N, NOPE + ROPE).split([NOPE, ROPE], dim=-1)
        compressed_kv, kpe = self.kv_a(x).split([RANK, ROPE], dim=-1)
        out = OPS.torch_mla(q_nope, q_pe, compressed_kv, kpe.view(b, s, 1, ROPE), self.kv_b.weight)
        return out.reshape(b, s, N * V)


def test_export_with_dynamic_seq() -> None:
    block = _MLABlock()
    seq = Dim("seq", min=2, max=64)
    exported = torch.export.export(block, (torch.randn(2, 5, 16),), dynamic_shapes=({1: seq},))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "auto_deploy.torch_mla.default" in targets
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(exported.module()(x), block(x))
