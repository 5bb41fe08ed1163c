"""Attention ops against float64 math written here and transformers' eager attention functions."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager
from transformers.models.llama.modeling_llama import repeat_kv as hf_repeat_kv

import onboardlm.ops.attention  # noqa: F401  (registers the attention ops)

OPS = torch.ops.auto_deploy
B, N, D, DV = 2, 4, 8, 6
HEADS = pytest.mark.parametrize("n_kv", [N, 2, 1], ids=["mha", "gqa", "mqa"])
LAYOUTS = pytest.mark.parametrize("layout", ["bnsd", "bsnd"])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 3e-2, "atol": 3e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}


def _qkv(
    n_kv: int, s_q: int, s_k: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bnsd query/key/value with a V head dim different from the QK head dim."""
    return (
        torch.randn(B, N, s_q, D, dtype=dtype),
        torch.randn(B, n_kv, s_k, D, dtype=dtype),
        torch.randn(B, n_kv, s_k, DV, dtype=dtype),
    )


def _to(layout: str, *xs: torch.Tensor) -> list[torch.Tensor]:
    """bnsd tensors as (non-contiguous) views in ``layout``."""
    return [x if layout == "bnsd" else x.transpose(1, 2) for x in xs]


def _allowed(
    s_q: int, s_k: int, causal: bool = False, window: int | None = None, q_offset: int = 0
) -> torch.Tensor:
    """``[s_q, s_k]`` bool from the definitions: causal ``k <= q``, window ``0 <= q - k < w``."""
    q_pos = torch.arange(s_q).unsqueeze(-1) + q_offset
    distance = q_pos - torch.arange(s_k)
    allowed = torch.ones(s_q, s_k, dtype=torch.bool)
    if causal:
        allowed &= distance >= 0
    if window is not None:
        allowed &= (distance >= 0) & (distance < window)
    return allowed


def _reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    allowed: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    cap: float | None = None,
) -> torch.Tensor:
    """float64 bnsd attention: KV repeated per group, cap, bias, mask, sink column dropped after softmax."""
    q, k, v = q.double(), k.double(), v.double()
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    if bias is not None:
        scores = scores + bias.double()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    if sinks is not None:
        sink_col = sinks.double().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return probs @ v


# (name, s_q, s_k, op kwargs, reference kwargs builder)
FEATURES: list[tuple[str, int, int, dict, Callable[[int, int], dict]]] = [
    ("plain", 5, 5, {}, lambda s_q, s_k: {}),
    ("causal", 5, 5, {"is_causal": True}, lambda s_q, s_k: {"allowed": _allowed(s_q, s_k, causal=True)}),
    ("causal_ignored_when_s_q_ne_s_k", 3, 7, {"is_causal": True}, lambda s_q, s_k: {}),
    (
        "window",
        6,
        6,
        {"is_causal": True, "sliding_window": 3},
        lambda s_q, s_k: {"allowed": _allowed(s_q, s_k, causal=True, window=3)},
    ),
    (
        "window_queries_after_keys",
        2,
        7,
        {"sliding_window": 4},
        lambda s_q, s_k: {"allowed": _allowed(s_q, s_k, window=4, q_offset=s_k)},
    ),
    ("cap", 5, 5, {"logit_cap": 2.0, "scale": 1.5}, lambda s_q, s_k: {"cap": 2.0, "scale": 1.5}),
    (
        "cap_and_causal",
        5,
        5,
        {"logit_cap": 2.0, "is_causal": True},
        lambda s_q, s_k: {"cap": 2.0, "allowed": _allowed(s_q, s_k, causal=True)},
    ),
    (
        "sinks",
        5,
        5,
        {"sinks": torch.linspace(-1.0, 2.0, N), "is_causal": True},
        lambda s_q, s_k: {"sinks": torch.linspace(-1.0, 2.0, N), "allowed": _allowed(s_q, s_k, causal=True)},
    ),
]


@pytest.mark.parametrize(
    ("s_q", "s_k", "kwargs", "ref_kwargs"),
    [f[1:] for f in FEATURES],
    ids=[f[0] for f in FEATURES],
)
@HEADS
@LAYOUTS
@DTYPES
def test_matches_float64(
    s_q: int,
    s_k: int,
    kwargs: dict,
    ref_kwargs: Callable[[int, int], dict],
    n_kv: int,
    layout: str,
    dtype: torch.dtype,
) -> None:
    q, k, v = _qkv(n_kv, s_q, s_k, dtype)
    out = OPS.torch_attention(*_to(layout, q, k, v), layout=layout, **kwargs)
    assert out.dtype == dtype and out.is_contiguous()
    (out,) = _to(layout, out)  # back to bnsd
    assert out.shape == (B, N, s_q, DV)
    torch.testing.assert_close(out.double(), _reference(q, k, v, **ref_kwargs(s_q, s_k)), **_tol(dtype))


@pytest.mark.parametrize("mask_batch", [1, B])
@pytest.mark.parametrize("mask_heads", [1, N])
@LAYOUTS
def test_bool_and_float_masks(mask_heads: int, mask_batch: int, layout: str) -> None:
    q, k, v = _qkv(2, 4, 6)
    allowed = torch.rand(mask_batch, mask_heads, 4, 6) > 0.4
    allowed[..., 0] = True  # every row keeps a key
    bias = torch.randn(mask_batch, mask_heads, 4, 6)
    expected_bool = _reference(q, k, v, allowed=allowed)
    expected_float = _reference(q, k, v, bias=bias)
    for mask, expected in ((allowed, expected_bool), (bias, expected_float)):
        (out,) = _to(layout, OPS.torch_attention(*_to(layout, q, k, v), attn_mask=mask, layout=layout))
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_bool_mask_equals_its_neg_inf_float_mask() -> None:
    q, k, v = _qkv(2, 5, 5)
    allowed = torch.rand(B, 1, 5, 5) > 0.5
    allowed[..., -1] = True
    neg_inf = torch.zeros(allowed.shape).masked_fill(~allowed, -math.inf)
    sinks = torch.randn(N)
    torch.testing.assert_close(
        OPS.torch_attention(q, k, v, attn_mask=allowed, sinks=sinks, logit_cap=3.0),
        OPS.torch_attention(q, k, v, attn_mask=neg_inf, sinks=sinks, logit_cap=3.0),
    )


def test_window_queries_after_keys_see_the_last_window_minus_one_keys() -> None:
    # a single query at position s_k attends to keys s_k-w+1 .. s_k-1 (OPS.md rule 6)
    window, s_k = 4, 9
    q, k, v = _qkv(2, 1, s_k)
    out = OPS.torch_attention(q, k, v, is_causal=True, sliding_window=window)
    last = slice(s_k - window + 1, None)
    torch.testing.assert_close(out, OPS.torch_attention(q, k[:, :, last], v[:, :, last]))


@pytest.mark.parametrize("sinks", [None, torch.zeros(N)], ids=["no_sinks", "sinks"])
def test_fully_masked_rows_give_zeros(sinks: torch.Tensor | None) -> None:
    q, k, v = _qkv(2, 4, 4)
    allowed = torch.ones(B, 1, 4, 4, dtype=torch.bool)
    allowed[1, :, 2] = False
    out = OPS.torch_attention(q, k, v, attn_mask=allowed, sinks=sinks, is_causal=True)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1, :, 2], torch.zeros(N, DV))
    kept = _reference(q, k, v, allowed=allowed & _allowed(4, 4, causal=True), sinks=sinks)
    torch.testing.assert_close(out[0].double(), kept[0], rtol=1e-5, atol=1e-5)


def test_window_removing_every_key_gives_zeros() -> None:
    q, k, v = _qkv(1, 2, 3)
    out = OPS.torch_attention(q, k, v, sliding_window=1)  # query positions 3, 4: keys 0..2 are too old
    assert torch.equal(out, torch.zeros_like(out))


def test_nan_inputs_still_propagate() -> None:
    q, k, v = _qkv(N, 3, 3)
    q[0, 0, 0, 0] = math.nan
    out = OPS.torch_attention(q, k, v)
    assert out[0, 0, 0].isnan().all() and not out[1].isnan().any()


def test_default_scale_uses_the_query_head_dim() -> None:
    q, k, v = _qkv(2, 5, 5)
    out = OPS.torch_attention(q, k, v)
    torch.testing.assert_close(out, OPS.torch_attention(q, k, v, scale=D**-0.5))
    assert not torch.allclose(out, OPS.torch_attention(q, k, v, scale=DV**-0.5))


def test_dropout_is_a_no_op() -> None:
    q, k, v = _qkv(2, 5, 5)
    assert torch.equal(OPS.torch_attention(q, k, v, dropout_p=0.5), OPS.torch_attention(q, k, v))


# --- transformers' eager attention -------------------------------------------------------------


def _hf_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """HF eager's additive mask: 0 where allowed, ``finfo(dtype).min`` elsewhere, ``[B, 1, s_q, s_k]``."""
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask.expand(B, 1, *allowed.shape[-2:])


def _hf_allowed(mask_function: Callable, s_q: int, s_k: int) -> torch.Tensor:
    """Evaluate a ``transformers.masking_utils`` mask function; queries are the last ``s_q`` positions."""
    q_idx = torch.arange(s_k - s_q, s_k).unsqueeze(-1)
    return mask_function(0, 0, q_idx, torch.arange(s_k).unsqueeze(0))


@pytest.mark.parametrize(("s_q", "s_k"), [(6, 6), (3, 7)], ids=["prefill", "chunk_after_prefix"])
@HEADS
@DTYPES
def test_matches_llama_eager(s_q: int, s_k: int, n_kv: int, dtype: torch.dtype) -> None:
    q, k, v = _qkv(n_kv, s_q, s_k, dtype)
    mask = _hf_mask(_hf_allowed(causal_mask_function, s_q, s_k), dtype)
    module = SimpleNamespace(num_key_value_groups=N // n_kv, training=False)
    expected, _ = llama_eager(module, q, k, v, mask, scaling=D**-0.5)  # bsnd
    for layout in ("bnsd", "bsnd"):
        out = OPS.torch_attention(*_to(layout, q, k, v), attn_mask=mask, is_causal=True, layout=layout)
        (out,) = _to("bsnd", *_to(layout, out))  # to bsnd whatever the layout
        torch.testing.assert_close(out, expected, **_tol(dtype))


def test_padding_row_matches_llama_eager() -> None:
    # a row masked entirely with HF's finite minimum: HF eager averages all values, and so do we
    q, k, v = _qkv(2, 4, 4)
    allowed = _hf_allowed(causal_mask_function, 4, 4).expand(B, 1, 4, 4).clone()
    allowed[0, :, 1] = False
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    expected, _ = llama_eager(SimpleNamespace(num_key_value_groups=2, training=False), q, k, v, mask, D**-0.5)
    out = OPS.torch_attention(q, k, v, attn_mask=mask, layout="bnsd").transpose(1, 2)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("window", [2, 4])
@HEADS
@DTYPES
def test_matches_gemma2_eager_softcap_and_window(window: int, n_kv: int, dtype: torch.dtype) -> None:
    s, scaling, softcap = 7, 0.3, 1.5
    q, k, v = _qkv(n_kv, s, s, dtype)
    q = 4.0 * q  # large scores so the cap matters
    mask = _hf_mask(_hf_allowed(sliding_window_causal_mask_function(window), s, s), dtype)
    module = SimpleNamespace(num_key_value_groups=N // n_kv, training=False, head_dim=D)
    expected, _ = gemma2_eager(module, q, k, v, mask, scaling=scaling, softcap=softcap)
    out = OPS.torch_attention(
        *_to("bsnd", q, k, v),
        is_causal=True,
        scale=scaling,
        sliding_window=window,
        logit_cap=softcap,
        layout="bsnd",
    )
    torch.testing.assert_close(out, expected, **_tol(dtype))
    uncapped = OPS.torch_attention(
        *_to("bsnd", q, k, v), is_causal=True, scale=scaling, sliding_window=window
    )
    assert not torch.allclose(uncapped.float(), expected.float(), **_tol(dtype))


@pytest.mark.parametrize("window", [None, 3])
@HEADS
@DTYPES
def test_matches_gpt_oss_eager_sinks(window: int | None, n_kv: int, dtype: torch.dtype) -> None:
    s = 6
    q, k, v = _qkv(n_kv, s, s, dtype)
    sinks = (2.0 * torch.randn(N)).to(dtype)
    mask_function = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    mask = _hf_mask(_hf_allowed(mask_function, s, s), dtype)
    module = SimpleNamespace(num_key_value_groups=N // n_kv, training=False, sinks=sinks)
    expected, _ = gpt_oss_eager(module, q, k, v, mask, scaling=D**-0.5)
    out = OPS.torch_attention(q, k, v, is_causal=True, sinks=sinks, sliding_window=window)
    torch.testing.assert_close(out.transpose(1, 2), expected, **_tol(dtype))


# --- SDPA wrapper and repeat_kv --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs", [{}, {"is_causal": True}, {"scale": 0.2}], ids=["plain", "causal", "scale"]
)
@pytest.mark.parametrize("n_kv", [N, 2], ids=["mha", "gqa"])
def test_sdpa_matches_functional(n_kv: int, kwargs: dict) -> None:
    # bnsd views of bsnd storage: not contiguous
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in _qkv(n_kv, 5, 5))
    enable_gqa = n_kv != N
    out = OPS.torch_attention_sdpa(q, k, v, enable_gqa=enable_gqa, **kwargs)
    assert out.is_contiguous()
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=enable_gqa, **kwargs)
    torch.testing.assert_close(out, expected)


def test_sdpa_with_mask_matches_torch_attention() -> None:
    q, k, v = _qkv(N, 4, 6)
    allowed = torch.rand(B, 1, 4, 6) > 0.3
    allowed[..., 0] = True
    torch.testing.assert_close(
        OPS.torch_attention_sdpa(q, k, v, attn_mask=allowed), OPS.torch_attention(q, k, v, attn_mask=allowed)
    )


@pytest.mark.parametrize("n_rep", [1, 3])
def test_repeat_kv_matches_transformers_and_copies(n_rep: int) -> None:
    x = torch.randn(B, 2, 5, D)
    out = OPS.torch_attention_repeat_kv(x, n_rep)
    assert torch.equal(out, hf_repeat_kv(x, n_rep))
    assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


# --- bad arguments ---------------------------------------------------------------------------------


def _bad_cases() -> list[tuple[str, tuple, dict, str]]:
    q, k, v = _qkv(2, 3, 5)
    return [
        ("layout", (q, k, v), {"layout": "nbsd"}, "layout"),
        ("heads_not_dividing", (q, torch.randn(B, 3, 5, D), torch.randn(B, 3, 5, DV)), {}, "key"),
        ("key_batch", (q, k[:1], v[:1]), {}, "key"),
        ("key_head_dim", (q, k[..., :4], v), {}, "key"),
        ("value_seq", (q, k, v[:, :, :4]), {}, "value"),
        ("query_rank", (q[0], k, v), {}, "query"),
        ("mask_shape", (q, k, v), {"attn_mask": torch.ones(B, N, 3, 4, dtype=torch.bool)}, "attn_mask"),
        ("mask_rank", (q, k, v), {"attn_mask": torch.ones(3, 5, dtype=torch.bool)}, "attn_mask"),
        ("mask_dtype", (q, k, v), {"attn_mask": torch.ones(B, N, 3, 5, dtype=torch.int64)}, "attn_mask"),
        ("sinks", (q, k, v), {"sinks": torch.zeros(2)}, "sinks"),
        ("dropout_p", (q, k, v), {"dropout_p": 1.5}, "dropout_p"),
        ("bsnd_heads", (q, k, v), {"layout": "bsnd"}, "key"),  # bnsd tensors read as bsnd: 3 ∤ 5
    ]


@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
@pytest.mark.parametrize("index", range(len(_bad_cases())), ids=[c[0] for c in _bad_cases()])
def test_rejects_bad_arguments(index: int, fake: bool) -> None:
    _, args, kwargs, argument = _bad_cases()[index]
    with pytest.raises(ValueError, match=argument):
        if fake:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                OPS.torch_attention(*(mode.from_tensor(a) for a in args), **kwargs)
        else:
            OPS.torch_attention(*args, **kwargs)


@pytest.mark.parametrize(
    ("args", "argument"), [((torch.randn(B, 2, 5, D), 0), "n_rep"), ((torch.randn(5, D), 2), "hidden_states")]
)
def test_repeat_kv_rejects_bad_arguments(args: tuple, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        OPS.torch_attention_repeat_kv(*args)


# --- registration: opcheck, fake kernels, aliasing, schema, export ----------------------------------


def _op_cases() -> list[tuple[str, tuple, dict]]:
    q, k, v = _qkv(2, 4, 4)
    bq, bk, bv = _to("bsnd", q, k, v)
    allowed = torch.rand(1, N, 4, 4) > 0.3
    return [
        ("torch_attention", (q, k, v), {"is_causal": True}),
        ("torch_attention", (bq, bk, bv), {"attn_mask": allowed, "sinks": torch.randn(N), "layout": "bsnd"}),
        (
            "torch_attention",
            (bq, bk, bv),
            {"sliding_window": 2, "logit_cap": 5.0, "is_causal": True, "layout": "bsnd"},
        ),
        (
            "torch_attention",
            (q.bfloat16(), k[:, :1].bfloat16(), v[:, :1].bfloat16()),
            {"attn_mask": torch.randn(B, 1, 4, 4)},
        ),
        (
            "torch_attention_sdpa",
            (q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)),
            {"is_causal": True},
        ),
        ("torch_attention_sdpa", (q, k, v), {"enable_gqa": True, "scale": 0.5}),
        ("torch_attention_repeat_kv", (k, 2), {}),
        ("torch_attention_repeat_kv", (bk, 1), {}),
    ]


CASES = pytest.mark.parametrize("index", range(len(_op_cases())))


@CASES
def test_opcheck(index: int) -> None:
    name, args, kwargs = _op_cases()[index]
    torch.library.opcheck(getattr(OPS, name).default, args, kwargs)


@CASES
def test_fake_matches_real_and_no_alias(index: int) -> None:
    name, args, kwargs = _op_cases()[index]
    op = getattr(OPS, name)
    real = op(*args, **kwargs)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args), **kwargs)
    assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())
    inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    assert all(real.untyped_storage().data_ptr() != a.untyped_storage().data_ptr() for a in inputs)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "torch_attention",
            [
                ("query", None),
                ("key", None),
                ("value", None),
                ("attn_mask", None),
                ("dropout_p", 0.0),
                ("is_causal", False),
                ("scale", None),
                ("sinks", None),
                ("sliding_window", None),
                ("logit_cap", None),
                ("layout", "bnsd"),
                # onboardlm's one extension, after AutoDeploy's arguments (which stay as they are):
                # Llama 4's chunked local attention; only files of chunked models pass it
                ("attention_chunk_size", None),
            ],
        ),
        (
            "torch_attention_sdpa",
            [
                ("query", None),
                ("key", None),
                ("value", None),
                ("attn_mask", None),
                ("dropout_p", 0.0),
                ("is_causal", False),
                ("scale", None),
                ("enable_gqa", False),
            ],
        ),
        ("torch_attention_repeat_kv", [("hidden_states", None), ("n_rep", None)]),
    ],
)
def test_schema_matches_autodeploy(name: str, expected: list[tuple[str, object]]) -> None:
    schema = getattr(OPS, name).default._schema
    assert [(a.name, a.default_value) for a in schema.arguments] == expected


class _AttentionBlock(torch.nn.Module):
    """GQA attention in bsnd with a sliding window, a cap and sinks, as a model file calls it."""

    def __init__(self, hidden: int = 16, n_kv: int = 2) -> None:
        super().__init__()
        self.q = torch.nn.Linear(hidden, N * D)
        self.kv = torch.nn.Linear(hidden, n_kv * (D + DV))
        self.sinks = torch.nn.Parameter(torch.randn(N))
        self.n_kv = n_kv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, N, D)
        k, v = self.kv(x).view(b, s, self.n_kv, D + DV).split([D, DV], dim=-1)
        out = OPS.torch_attention(
            q, k, v, is_causal=True, sliding_window=3, logit_cap=4.0, sinks=self.sinks, layout="bsnd"
        )
        return out.reshape(b, s, N * DV)


def test_export_with_dynamic_seq() -> None:
    block = _AttentionBlock()
    seq = Dim("seq", min=2, max=64)
    exported = torch.export.export(block, (torch.randn(2, 5, 16),), dynamic_shapes=({1: seq},))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "auto_deploy.torch_attention.default" in targets
    x = torch.randn(2, 11, 16)
    torch.testing.assert_close(exported.module()(x), block(x))
