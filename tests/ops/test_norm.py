"""Normalisation ops against transformers' modules and float64 references written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mamba2 import modeling_mamba2
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNormGated
from transformers.models.qwen3_next.modeling_qwen3_next import l2norm as qwen3_next_l2norm

import onboardlm.ops.norm  # noqa: F401  (registers the normalisation ops)

OPS = torch.ops.auto_deploy
# transformers 5.25 renamed MambaRMSNormGated to Mamba2RMSNormGated; the tests cover both releases.
MAMBA2_GATED_NORM = getattr(modeling_mamba2, "Mamba2RMSNormGated", None) or modeling_mamba2.MambaRMSNormGated
H = 16
EPS = 1e-5
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
SHAPES = pytest.mark.parametrize("shape", [(3, H), (2, 5, H)])


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}


def _rms_f64(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _gated_f64(
    x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, group_size: int, norm_before_gate: bool
) -> torch.Tensor:
    x = x.double()
    silu = None if gate is None else F.silu(gate.double())
    if silu is not None and not norm_before_gate:
        x = x * silu
    groups = [_rms_f64(chunk, EPS) for chunk in x.split(group_size, dim=-1)]
    out = torch.cat(groups, dim=-1) * weight.double()
    return out * silu if silu is not None and norm_before_gate else out


def _weight(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (1.0 + 0.5 * torch.randn(H)).to(dtype)


@SHAPES
@DTYPES
def test_rmsnorm_matches_llama(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = 3.0 * torch.randn(shape, dtype=dtype)
    hf = LlamaRMSNorm(H, eps=EPS).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(_weight())
    out = OPS.torch_rmsnorm(x, hf.weight, EPS)
    assert out.dtype == dtype
    torch.testing.assert_close(out, hf(x))


@SHAPES
@DTYPES
def test_rmsnorm_matches_float64(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x, weight = 3.0 * torch.randn(shape, dtype=dtype), _weight(dtype)
    out = OPS.torch_rmsnorm(x, weight, EPS)
    torch.testing.assert_close(out.double(), _rms_f64(x, EPS) * weight.double(), **_tol(dtype))


def test_rmsnorm_computes_in_fp32() -> None:
    # fp16 squares overflow for |x| > 256: only an fp32 reduction stays finite
    x = torch.full((2, H), 1000.0, dtype=torch.float16)
    out = OPS.torch_rmsnorm(x, torch.ones(H, dtype=torch.float16), EPS)
    torch.testing.assert_close(out, torch.ones_like(x))


def test_rmsnorm_has_no_unit_offset() -> None:
    out = OPS.torch_rmsnorm(torch.randn(2, H), torch.zeros(H), EPS)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size", [4, H])
@pytest.mark.parametrize("with_gate", [True, False])
@DTYPES
def test_rmsnorm_gated_matches_float64(
    dtype: torch.dtype, with_gate: bool, group_size: int, norm_before_gate: bool
) -> None:
    x, weight = 2.0 * torch.randn(2, 5, H, dtype=dtype), _weight()
    gate = torch.randn(2, 5, H, dtype=dtype) if with_gate else None
    out = OPS.torch_rmsnorm_gated(x, weight, gate, EPS, group_size, norm_before_gate)
    assert out.dtype == dtype
    expected = _gated_f64(x, weight, gate, group_size, norm_before_gate)
    torch.testing.assert_close(out.double(), expected, **_tol(dtype))


@pytest.mark.parametrize("with_gate", [True, False])
@pytest.mark.parametrize("group_size", [4, H])
def test_rmsnorm_gated_matches_mamba2(group_size: int, with_gate: bool) -> None:
    hf = MAMBA2_GATED_NORM(H, group_size, eps=EPS)
    with torch.no_grad():
        hf.weight.copy_(_weight())
    x = torch.randn(2, 5, H)
    gate = torch.randn(2, 5, H) if with_gate else None
    out = OPS.torch_rmsnorm_gated(x, hf.weight, gate, EPS, group_size, False)
    torch.testing.assert_close(out, hf(x, gate))


def test_rmsnorm_gated_matches_qwen3_next() -> None:
    hf = Qwen3NextRMSNormGated(H, eps=EPS)
    with torch.no_grad():
        hf.weight.copy_(_weight())
    x, gate = torch.randn(2, 5, H), torch.randn(2, 5, H)
    out = OPS.torch_rmsnorm_gated(x, hf.weight, gate, EPS, H, norm_before_gate=True)
    torch.testing.assert_close(out, hf(x, gate))


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"group_size": 5}, "group_size"),
        ({"group_size": 4, "tp_mode": "diagonal"}, "tp_mode"),
        ({"group_size": 4, "layer_type": "attention"}, "layer_type"),
    ],
)
def test_rmsnorm_gated_rejects_bad_arguments(kwargs: dict[str, object], argument: str) -> None:
    x = torch.randn(2, H)
    with pytest.raises(ValueError, match=argument):
        OPS.torch_rmsnorm_gated(x, torch.ones(H), None, EPS, **kwargs)


@pytest.mark.parametrize(("tp_mode", "layer_type"), [("colwise", "ssm"), ("rowwise", "delta")])
def test_rmsnorm_gated_hints_change_nothing(tp_mode: str, layer_type: str) -> None:
    x, gate, weight = torch.randn(2, H), torch.randn(2, H), _weight()
    plain = OPS.torch_rmsnorm_gated(x, weight, gate, EPS, 4)
    hinted = OPS.torch_rmsnorm_gated(x, weight, gate, EPS, 4, tp_mode=tp_mode, layer_type=layer_type)
    assert torch.equal(plain, hinted)


@SHAPES
@DTYPES
def test_l2norm_matches_float64_and_qwen3_next(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = 3.0 * torch.randn(shape, dtype=dtype)
    out = OPS.torch_l2norm(x)
    assert out.dtype == dtype
    x64 = x.double()
    torch.testing.assert_close(
        out.double(), x64 / torch.sqrt(x64.pow(2).sum(-1, keepdim=True) + 1e-6), **_tol(dtype)
    )
    torch.testing.assert_close(out.float(), qwen3_next_l2norm(x.float()), **_tol(dtype))


def test_l2norm_eps_is_used() -> None:
    x = torch.full((1, 4), 0.5)  # sum of squares = 1
    torch.testing.assert_close(OPS.torch_l2norm(x, 3.0), x / 2.0)


def _cases(dtype: torch.dtype, transposed: bool) -> list[tuple[str, tuple]]:
    x, gate = torch.randn(5, 2, H, dtype=dtype), torch.randn(5, 2, H, dtype=dtype)
    if transposed:
        x, gate = x.transpose(0, 1), gate.transpose(0, 1)
    return [
        ("torch_rmsnorm", (x, _weight(dtype), EPS)),
        ("torch_rmsnorm_gated", (x, _weight(), gate, EPS, 4, False, "none", "ssm")),
        ("torch_rmsnorm_gated", (x, _weight(), gate, EPS, H, True)),
        ("torch_rmsnorm_gated", (x, _weight(), None, EPS, 8)),
        ("torch_l2norm", (x, 1e-6)),
    ]


@pytest.mark.parametrize("transposed", [False, True])
@DTYPES
@pytest.mark.parametrize("index", range(5))
def test_opcheck(index: int, dtype: torch.dtype, transposed: bool) -> None:
    name, args = _cases(dtype, transposed)[index]
    torch.library.opcheck(getattr(OPS, name).default, args)


@pytest.mark.parametrize("index", range(5))
def test_fake_matches_real_and_no_alias(index: int) -> None:
    name, args = _cases(torch.bfloat16, transposed=True)[index]
    op = getattr(OPS, name)
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert (fake.shape, fake.dtype) == (real.shape, real.dtype)
    assert real.untyped_storage().data_ptr() != args[0].untyped_storage().data_ptr()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("torch_rmsnorm", [("input", None), ("weight", None), ("eps", None)]),
        (
            "torch_rmsnorm_gated",
            [
                ("x", None),
                ("weight", None),
                ("gate", None),
                ("eps", None),
                ("group_size", None),
                ("norm_before_gate", False),
                ("tp_mode", "none"),
                ("layer_type", "unknown"),
            ],
        ),
        ("torch_l2norm", [("x", None), ("eps", 1e-6)]),
    ],
)
def test_schema_matches_autodeploy(name: str, expected: list[tuple[str, object]]) -> None:
    schema = getattr(OPS, name).default._schema
    assert [(a.name, a.default_value) for a in schema.arguments] == expected


class _NormBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(_weight())
        self.w2 = torch.nn.Parameter(_weight())

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = OPS.torch_rmsnorm(x, self.w1, EPS)
        h = OPS.torch_rmsnorm_gated(h, self.w2, gate, EPS, 4, tp_mode="colwise", layer_type="ssm")
        return OPS.torch_l2norm(h)


def test_export_with_dynamic_seq() -> None:
    block = _NormBlock()
    seq = Dim("seq", min=2, max=64)
    exported = torch.export.export(
        block, (torch.randn(2, 5, H), torch.randn(2, 5, H)), dynamic_shapes=({1: seq}, {1: seq})
    )
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {
        f"auto_deploy.{name}.default" for name in ("torch_rmsnorm", "torch_rmsnorm_gated", "torch_l2norm")
    } <= targets
    x, gate = torch.randn(2, 11, H), torch.randn(2, 11, H)
    torch.testing.assert_close(exported.module()(x, gate), block(x, gate))
