"""State-space ops against transformers' Mamba2 / Qwen3-Next code and float64 recurrences written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim
from transformers import Mamba2Config
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer, mamba2_chunk_scan
from transformers.models.mamba2.modeling_mamba2 import causal_conv1d_fn as mamba2_causal_conv1d_fn
from transformers.models.qwen3_next.modeling_qwen3_next import (
    torch_chunk_gated_delta_rule,
    torch_recurrent_gated_delta_rule,
)

import onboardlm.ops.ssm  # noqa: F401  (registers the state-space ops)

OPS = torch.ops.auto_deploy
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
FP32_TOL = {"rtol": 1e-4, "atol": 1e-4}
INF = math.inf


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else FP32_TOL


# ---------------------------------------------------------------------------------------------------------
# causal conv1d
# ---------------------------------------------------------------------------------------------------------


def _conv_f64(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int, groups: int):
    c_out, _, kernel = weight.shape
    conv = torch.nn.Conv1d(
        x.shape[-1], c_out, kernel, padding=dilation * (kernel - 1), dilation=dilation, groups=groups,
        bias=bias is not None, dtype=torch.float64,
    )  # fmt: skip
    with torch.no_grad():
        conv.weight.copy_(weight.double())
        if bias is not None:
            conv.bias.copy_(bias.double())
        return conv(x.double().transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)


@pytest.mark.parametrize(
    ("c_in", "c_out", "groups", "kernel", "dilation", "with_bias"),
    [
        (6, 6, 6, 4, 1, True),  # depthwise, as Mamba2 / Gated DeltaNet use it
        (6, 6, 6, 3, 2, False),  # dilated
        (4, 6, 2, 3, 1, True),  # grouped, more outputs than inputs
        (5, 3, 1, 1, 1, True),  # pointwise: no padding
    ],
)
@DTYPES
def test_causal_conv1d_matches_nn_conv1d(
    dtype: torch.dtype, c_in: int, c_out: int, groups: int, kernel: int, dilation: int, with_bias: bool
) -> None:
    x = torch.randn(2, 9, c_in, dtype=dtype)
    weight = torch.randn(c_out, c_in // groups, kernel, dtype=dtype)
    bias = torch.randn(c_out, dtype=dtype) if with_bias else None
    out = OPS.torch_causal_conv1d(x, weight, bias, 1, dilation * (kernel - 1), dilation, groups)
    assert out.shape == (2, 9, c_out) and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), _conv_f64(x, weight, bias, dilation, groups), **_tol(dtype))


@DTYPES
def test_causal_conv1d_matches_mamba2(dtype: torch.dtype) -> None:
    x, weight, bias = (torch.randn(shape, dtype=dtype) for shape in [(2, 7, 8), (8, 1, 4), (8,)])
    out = F.silu(OPS.torch_causal_conv1d(x, weight, bias, 1, 3, 1, 8))
    expected = mamba2_causal_conv1d_fn(x.transpose(1, 2), weight.squeeze(1), bias, activation="silu")
    torch.testing.assert_close(out, expected.transpose(1, 2), **_tol(dtype))


def test_causal_conv1d_is_causal() -> None:
    x, weight = torch.randn(1, 10, 4), torch.randn(4, 1, 3)
    changed = x.clone()
    changed[:, 5] += 1.0
    before, after = (OPS.torch_causal_conv1d(t, weight, None, 1, 4, 2, 4) for t in (x, changed))
    assert torch.equal(before[:, :5], after[:, :5])
    assert not torch.allclose(before[:, 5], after[:, 5])


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"padding_mode": "circular"}, "padding_mode"),
        ({"stride": 2}, "stride"),
        ({"padding": 1}, "padding"),
        ({"output_sizes": [2, 1]}, "output_sizes"),
        ({"layer_type": "conv"}, "layer_type"),
    ],
)
def test_causal_conv1d_rejects_bad_arguments(kwargs: dict[str, object], argument: str) -> None:
    arguments = {"stride": 1, "padding": 2, "dilation": 1, "groups": 4} | kwargs
    with pytest.raises(ValueError, match=argument):
        OPS.torch_causal_conv1d(torch.randn(1, 5, 4), torch.randn(4, 1, 3), None, **arguments)


# ---------------------------------------------------------------------------------------------------------
# Mamba2 SSM
# ---------------------------------------------------------------------------------------------------------


def _ssm_inputs(seq_len: int, heads: int, groups: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """hidden_states, A, B, C, D, dt, dt_bias as a Mamba2 mixer feeds them (A from A_log in fp32)."""
    batch, head_dim, state = 2, 3, 4
    return (
        torch.randn(batch, seq_len, heads, head_dim, dtype=dtype),
        -torch.exp(0.5 * torch.randn(heads)),
        torch.randn(batch, seq_len, groups, state, dtype=dtype),
        torch.randn(batch, seq_len, groups, state, dtype=dtype),
        torch.randn(heads, dtype=dtype),
        torch.randn(batch, seq_len, heads, dtype=dtype),
        torch.randn(heads, dtype=dtype),
    )


def _ssm_f64(x, A, B, C, D, dt, dt_bias, limit: list[float]) -> torch.Tensor:
    """Step-by-step Mamba2 recurrence in float64: h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ, y_t = h_t C_t + D x_t."""
    x, A, B, C, D, dt, dt_bias = (t.double() for t in (x, A, B, C, D, dt, dt_bias))
    batch, seq_len, heads, head_dim = x.shape
    per_group = heads // B.shape[2]
    B, C = B.repeat_interleave(per_group, dim=2), C.repeat_interleave(per_group, dim=2)
    step = F.softplus(dt + dt_bias).clamp(*limit)
    state = torch.zeros(batch, heads, head_dim, B.shape[-1], dtype=torch.float64)
    ys = []
    for t in range(seq_len):
        state = state * torch.exp(step[:, t] * A)[..., None, None]
        state = state + torch.einsum("bh,bhp,bhn->bhpn", step[:, t], x[:, t], B[:, t])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]) + D[:, None] * x[:, t])
    return torch.stack(ys, dim=1)


@pytest.mark.parametrize(
    ("seq_len", "chunk_size", "limit"),
    [
        (1, 4, [0.0, INF]),
        (8, 4, [0.0, INF]),
        (11, 4, [0.0, INF]),  # chunk size does not divide the sequence
        (11, 4, [0.3, 0.6]),  # the time-step clamp bites on both sides
        (5, 16, [0.0, INF]),  # one partial chunk
        (9, 1, [0.0, INF]),
    ],
)
@pytest.mark.parametrize("groups", [1, 2])
@DTYPES
def test_ssm_matches_sequential_float64(
    dtype: torch.dtype, groups: int, seq_len: int, chunk_size: int, limit: list[float]
) -> None:
    inputs = _ssm_inputs(seq_len, 4, groups, dtype)
    out = OPS.torch_ssm(*inputs, limit, chunk_size)
    # computed in fp32 from the given values and returned in fp32, whatever the input dtype
    assert out.dtype == torch.float32 and out.shape == inputs[0].shape
    torch.testing.assert_close(out.double(), _ssm_f64(*inputs, limit), **FP32_TOL)


@pytest.mark.parametrize(("seq_len", "chunk_size"), [(11, 4), (8, 8)])
def test_ssm_matches_mamba2_chunk_scan(seq_len: int, chunk_size: int) -> None:
    x, A, B, C, D, dt, dt_bias = _ssm_inputs(seq_len, 4, 2, torch.float32)
    out = OPS.torch_ssm(x, A, B, C, D, dt, dt_bias, [0.05, 1.5], chunk_size)
    expected = mamba2_chunk_scan(
        x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=(0.05, 1.5)
    )
    torch.testing.assert_close(out, expected, **FP32_TOL)


def _mamba2_mixer(time_step_limit: tuple[float, float], dtype: torch.dtype) -> Mamba2Mixer:
    config = Mamba2Config(
        hidden_size=8, expand=2, num_heads=4, head_dim=4, state_size=4, n_groups=2, conv_kernel=4, chunk_size=4,
        time_step_limit=time_step_limit, num_hidden_layers=1, vocab_size=16,
    )  # fmt: skip
    mixer = Mamba2Mixer(config, layer_idx=0)
    with torch.no_grad():
        mixer.D.normal_()
    return mixer.to(dtype).eval()


def _mixer_on_ops(m: Mamba2Mixer, hidden: torch.Tensor) -> torch.Tensor:
    """The no-cache Mamba2 mixer forward written with the canonical ops (as an AutoDeploy model file does)."""
    batch, seq_len, _ = hidden.shape
    bc_size = m.n_groups * m.ssm_state_size
    gate, xbc, dt = m.in_proj(hidden).split([m.intermediate_size, m.conv_dim, m.num_heads], dim=-1)
    conv = m.conv1d
    xbc = OPS.torch_causal_conv1d(
        xbc, conv.weight, conv.bias, conv.stride[0], conv.padding[0], conv.dilation[0], conv.groups,
        conv.padding_mode,
    )  # fmt: skip
    x, B, C = F.silu(xbc).split([m.intermediate_size, bc_size, bc_size], dim=-1)
    y = OPS.torch_ssm(
        x.reshape(batch, seq_len, -1, m.head_dim),
        -torch.exp(m.A_log.float()),
        B.reshape(batch, seq_len, -1, m.ssm_state_size),
        C.reshape(batch, seq_len, -1, m.ssm_state_size),
        m.D,
        dt,
        m.dt_bias,
        list(m.time_step_limit),
        m.chunk_size,
    )
    return m.out_proj(m.norm(y.reshape(batch, seq_len, -1), gate).to(hidden.dtype))


@pytest.mark.parametrize(
    ("dtype", "seq_len", "time_step_limit"),
    [
        (torch.float32, 7, (0.0, INF)),
        (torch.float32, 8, (0.02, 0.2)),
        (torch.bfloat16, 7, (0.02, 0.2)),
        (torch.bfloat16, 8, (0.0, INF)),
    ],
)
def test_ops_reproduce_mamba2_mixer(
    dtype: torch.dtype, seq_len: int, time_step_limit: tuple[float, float]
) -> None:
    mixer = _mamba2_mixer(time_step_limit, dtype)
    hidden = torch.randn(2, seq_len, 8, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(_mixer_on_ops(mixer, hidden), mixer(hidden), **_tol(dtype))


@pytest.mark.parametrize(
    ("heads", "groups", "kwargs", "argument"),
    [
        (4, 3, {}, "groups"),
        (4, 2, {"time_step_limit": [0.0]}, "time_step_limit"),
        (4, 2, {"chunk_size": 0}, "chunk_size"),
        (4, 2, {"layer_type": "mamba"}, "layer_type"),
    ],
)
def test_ssm_rejects_bad_arguments(heads: int, groups: int, kwargs: dict[str, object], argument: str) -> None:
    arguments = {"time_step_limit": [0.0, INF], "chunk_size": 4} | kwargs
    with pytest.raises(ValueError, match=argument):
        OPS.torch_ssm(*_ssm_inputs(5, heads, groups, torch.float32), **arguments)


# ---------------------------------------------------------------------------------------------------------
# gated delta rule
# ---------------------------------------------------------------------------------------------------------


def _gdr_inputs(seq_len: int, k_heads: int, v_heads: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q, k, v, a, b, A_log, dt_bias as a Gated DeltaNet layer feeds them."""
    batch, k_dim, v_dim = 2, 4, 3
    return (
        torch.randn(batch, seq_len, k_heads, k_dim, dtype=dtype),
        torch.randn(batch, seq_len, k_heads, k_dim, dtype=dtype),
        torch.randn(batch, seq_len, v_heads, v_dim, dtype=dtype),
        torch.randn(batch, seq_len, v_heads, dtype=dtype),
        torch.randn(batch, seq_len, v_heads, dtype=dtype),
        torch.log(torch.empty(v_heads).uniform_(0.01, 16)),
        torch.randn(v_heads),
    )


def _gates(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):
    """Decay g and write strength beta exactly as Qwen3NextGatedDeltaNet.forward computes them."""
    return -A_log.float().exp() * F.softplus(a.float() + dt_bias), b.sigmoid()


def _gdr_f64(q, k, v, a, b, A_log, dt_bias, scale: float | None = None) -> torch.Tensor:
    """Token-by-token gated delta rule in float64, L2 norm and gates computed from the raw inputs."""
    q, k, v, a, b, A_log, dt_bias = (t.double() for t in (q, k, v, a, b, A_log, dt_bias))
    repeats = v.shape[2] // q.shape[2]
    q, k = (
        (t * torch.rsqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6)).repeat_interleave(repeats, dim=2)
        for t in (q, k)
    )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    decay = torch.exp(-A_log.exp() * F.softplus(a + dt_bias))
    beta = torch.sigmoid(b)
    state = torch.zeros(v.shape[0], v.shape[2], q.shape[-1], v.shape[-1], dtype=torch.float64)
    outs = []
    for t in range(v.shape[1]):
        state = state * decay[:, t, :, None, None]
        error = v[:, t] - torch.einsum("bhkv,bhk->bhv", state, k[:, t])
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * error)
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("seq_len", [1, 9, 64, 70])  # the op scans chunks of 64
@pytest.mark.parametrize(("k_heads", "v_heads"), [(2, 2), (1, 3), (2, 4)])
@DTYPES
def test_gated_delta_rule_matches_sequential_float64(
    dtype: torch.dtype, k_heads: int, v_heads: int, seq_len: int
) -> None:
    inputs = _gdr_inputs(seq_len, k_heads, v_heads, dtype)
    out = OPS.torch_gated_delta_rule(*inputs)
    assert out.dtype == dtype and out.shape == inputs[2].shape
    torch.testing.assert_close(out.double(), _gdr_f64(*inputs), **_tol(dtype))


def test_gated_delta_rule_carries_state_across_chunks() -> None:
    # slow decays keep the first chunk's writes alive through two more chunks of 64
    q, k, v, a, b, _, dt_bias = _gdr_inputs(150, 1, 2, torch.float32)
    A_log = torch.log(torch.tensor([0.01, 0.05]))
    out = OPS.torch_gated_delta_rule(q, k, v, a, b, A_log, dt_bias)
    torch.testing.assert_close(out.double(), _gdr_f64(q, k, v, a, b, A_log, dt_bias), **FP32_TOL)


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_gated_delta_rule_scale(scale: float) -> None:
    inputs = _gdr_inputs(9, 2, 2, torch.float32)
    out = OPS.torch_gated_delta_rule(*inputs, scale)
    torch.testing.assert_close(out.double(), _gdr_f64(*inputs, scale), **FP32_TOL)


@pytest.mark.parametrize("reference", [torch_chunk_gated_delta_rule, torch_recurrent_gated_delta_rule])
@pytest.mark.parametrize("seq_len", [9, 70])
@pytest.mark.parametrize(("k_heads", "v_heads"), [(2, 2), (2, 4)])
@DTYPES
def test_gated_delta_rule_matches_qwen3_next(
    dtype: torch.dtype, k_heads: int, v_heads: int, seq_len: int, reference
) -> None:
    q, k, v, a, b, A_log, dt_bias = _gdr_inputs(seq_len, k_heads, v_heads, dtype)
    g, beta = _gates(a, b, A_log, dt_bias)
    expected, _ = reference(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    out = OPS.torch_gated_delta_rule(q, k, v, a, b, A_log, dt_bias)
    torch.testing.assert_close(out, expected, **_tol(dtype))


@pytest.mark.parametrize(
    ("k_heads", "v_heads", "layer_type", "argument"),
    [(2, 3, "unknown", "heads"), (2, 4, "linear", "layer_type")],
)
def test_gated_delta_rule_rejects_bad_arguments(
    k_heads: int, v_heads: int, layer_type: str, argument: str
) -> None:
    inputs = _gdr_inputs(5, k_heads, v_heads, torch.float32)
    with pytest.raises(ValueError, match=argument):
        OPS.torch_gated_delta_rule(*inputs, layer_type=layer_type)


# ---------------------------------------------------------------------------------------------------------
# all three: hints, opcheck, fakes, aliasing, schema, export
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "args", "hints"),
    [
        (
            "torch_causal_conv1d",
            lambda: (torch.randn(2, 5, 6), torch.randn(6, 1, 3), torch.randn(6), 1, 2, 1, 6),
            {"shardable": True, "output_sizes": [2, 2, 2], "layer_type": "ssm"},
        ),
        (
            "torch_ssm",
            lambda: (*_ssm_inputs(6, 4, 2, torch.float32), [0.0, INF], 4),
            {"shardable": True, "layer_type": "ssm"},
        ),
        (
            "torch_gated_delta_rule",
            lambda: _gdr_inputs(6, 2, 4, torch.float32),
            {"shardable": True, "layer_type": "delta"},
        ),
    ],
)
def test_hints_change_nothing(name: str, args, hints: dict[str, object]) -> None:
    op, inputs = getattr(OPS, name), args()
    assert torch.equal(op(*inputs), op(*inputs, **hints))


def _strided(t: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous layout (batch-minor storage)."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def _cases() -> list[tuple[str, tuple]]:
    """Per op: non-contiguous fp32 inputs with defaults, then bf16 inputs with every argument given."""
    f32, bf16 = torch.float32, torch.bfloat16
    x, weight, bias = (torch.randn(shape, dtype=f32) for shape in [(2, 7, 6), (6, 1, 4), (6,)])
    hs, A, B, C, D, dt, dt_bias = _ssm_inputs(7, 4, 2, f32)
    q, k, v, a, b, A_log, gdr_bias = _gdr_inputs(7, 1, 2, f32)
    conv_bf16 = (
        torch.randn(2, 7, 6, dtype=bf16),
        torch.randn(4, 3, 2, dtype=bf16),
        torch.randn(4, dtype=bf16),
    )
    return [
        ("torch_causal_conv1d", (_strided(x), weight, bias, 1, 3, 1, 6)),
        ("torch_causal_conv1d", (*conv_bf16, 1, 2, 2, 2, "zeros", True, [2, 2], "ssm")),
        ("torch_ssm", (_strided(hs), A, _strided(B), C, D, _strided(dt), dt_bias, [0.0, INF], 4)),
        ("torch_ssm", (*_ssm_inputs(7, 4, 2, bf16), [0.05, 2.0], 3, True, "ssm")),
        ("torch_gated_delta_rule", (_strided(q), k, _strided(v), a, _strided(b), A_log, gdr_bias)),
        ("torch_gated_delta_rule", (*_gdr_inputs(7, 1, 2, bf16), 0.3, True, "delta")),
    ]


@pytest.mark.parametrize("index", range(6))
def test_opcheck(index: int) -> None:
    name, args = _cases()[index]
    torch.library.opcheck(getattr(OPS, name).default, args)


@pytest.mark.parametrize("index", range(6))
def test_fake_matches_real_and_no_alias(index: int) -> None:
    name, args = _cases()[index]
    op = getattr(OPS, name)
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())
    inputs = [a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)]
    assert real.untyped_storage().data_ptr() not in inputs


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "torch_causal_conv1d",
            [
                ("input", None),
                ("weight", None),
                ("bias", None),
                ("stride", 1),
                ("padding", 0),
                ("dilation", 1),
                ("groups", 1),
                ("padding_mode", "zeros"),
                ("shardable", False),
                ("output_sizes", None),
                ("layer_type", "unknown"),
            ],
        ),
        (
            "torch_ssm",
            [
                *((n, None) for n in ("hidden_states", "A", "B", "C", "D", "dt", "dt_bias")),
                ("time_step_limit", None),
                ("chunk_size", None),
                ("shardable", False),
                ("layer_type", "unknown"),
            ],
        ),
        (
            "torch_gated_delta_rule",
            [
                *((n, None) for n in ("q", "k", "v", "a", "b", "A_log", "dt_bias")),
                ("scale", None),
                ("shardable", False),
                ("layer_type", "unknown"),
            ],
        ),
    ],
)
def test_schema_matches_autodeploy(name: str, expected: list[tuple[str, object]]) -> None:
    schema = getattr(OPS, name).default._schema
    assert [(a.name, a.default_value) for a in schema.arguments] == expected


class _HybridBlock(torch.nn.Module):
    """Conv -> Mamba2 scan -> gated delta rule, enough to trace all three ops with a symbolic length."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_weight = torch.nn.Parameter(torch.randn(12, 1, 4))
        self.conv_bias = torch.nn.Parameter(torch.randn(12))
        self.A_log = torch.nn.Parameter(torch.randn(2))
        self.D = torch.nn.Parameter(torch.randn(2))
        self.dt_bias = torch.nn.Parameter(torch.randn(2))

    def forward(self, xbc: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        xbc = F.silu(OPS.torch_causal_conv1d(xbc, self.conv_weight, self.conv_bias, 1, 3, 1, 12))
        x, B, C = xbc.split([4, 4, 4], dim=-1)
        y = OPS.torch_ssm(
            x.unflatten(-1, (2, 2)), -self.A_log.exp(), B.unflatten(-1, (1, 4)), C.unflatten(-1, (1, 4)),
            self.D, dt, self.dt_bias, [0.0, INF], 4,
        )  # fmt: skip
        return OPS.torch_gated_delta_rule(
            B.unflatten(-1, (1, 4)), C.unflatten(-1, (1, 4)), y, a, b, self.A_log, self.dt_bias
        )


def test_export_with_dynamic_seq() -> None:
    block = _HybridBlock()

    def inputs(seq_len: int) -> tuple[torch.Tensor, ...]:
        return tuple(torch.randn(2, seq_len, channels) for channels in (12, 2, 2, 2))

    seq = Dim("seq", min=2, max=256)
    exported = torch.export.export(block, inputs(6), dynamic_shapes=tuple({1: seq} for _ in range(4)))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {
        f"auto_deploy.{name}.default"
        for name in ("torch_causal_conv1d", "torch_ssm", "torch_gated_delta_rule")
    } <= targets
    args = inputs(70)  # not a multiple of either chunk size, and longer than one gated-delta chunk
    torch.testing.assert_close(exported.module()(*args), block(*args))
