"""Linear and sharding-hint ops: plain torch semantics, fresh outputs, hint validation, export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim

import onboardlm.ops.linear
import onboardlm.ops.sharding  # noqa: F401  (registers the linear and sharding-hint ops)

OPS = torch.ops.auto_deploy
N, N_KV, D = 4, 2, 8
HIDDEN = N * D
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
BAD_HINTS = pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"tp_mode": "column"}, "tp_mode"),
        ({"layer_type": "attention"}, "layer_type"),
        ({"tp_mode": ""}, "tp_mode"),
    ],
)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(3, HIDDEN), (2, 5, HIDDEN)])
@DTYPES
def test_linear_equals_f_linear(dtype: torch.dtype, shape: tuple[int, ...], with_bias: bool) -> None:
    x, w = torch.randn(shape, dtype=dtype), torch.randn(6, HIDDEN, dtype=dtype)
    b = torch.randn(6, dtype=dtype) if with_bias else None
    out = OPS.torch_linear_simple(x, w, b)
    assert out.dtype == dtype
    assert torch.equal(out, F.linear(x, w, b))


@pytest.mark.parametrize(
    "hints",
    [
        {
            "tp_mode": "colwise",
            "output_sizes": [HIDDEN, N_KV * D, N_KV * D],
            "tp_min_local_shape": D,
            "layer_type": "mha",
        },
        {"tp_mode": "rowwise", "layer_type": "mlp"},
        {"tp_mode": "none", "layer_type": "moe"},
        {"tp_mode": "colwise", "tp_min_local_shape": 4, "layer_type": "delta"},
    ],
)
def test_linear_hints_change_nothing(hints: dict[str, object]) -> None:
    x, w, b = (
        torch.randn(2, 5, HIDDEN),
        torch.randn(HIDDEN + 2 * N_KV * D, HIDDEN),
        torch.randn(HIDDEN + 2 * N_KV * D),
    )
    assert torch.equal(OPS.torch_linear_simple(x, w, b, **hints), OPS.torch_linear_simple(x, w, b))


@BAD_HINTS
def test_linear_rejects_bad_hints(kwargs: dict[str, str], argument: str) -> None:
    x, w = torch.randn(2, HIDDEN), torch.randn(6, HIDDEN)
    with pytest.raises(ValueError, match=argument):
        OPS.torch_linear_simple(x, w, None, **kwargs)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match=argument):
        OPS.torch_linear_simple(mode.from_tensor(x), mode.from_tensor(w), None, **kwargs)


@pytest.mark.parametrize(
    "op_call",
    [
        lambda x: OPS.view(x, [2, 15, D], layer_type="moon"),
        lambda x: OPS.split_with_sizes(x, [3, 5], layer_type="MHA"),
        lambda x: OPS.all_reduce(x, layer_type=""),
    ],
)
def test_hint_ops_reject_bad_layer_type(op_call) -> None:
    with pytest.raises(ValueError, match="layer_type"):
        op_call(torch.randn(2, 5, 3, D))


@pytest.mark.parametrize("tp_scaled_dim", [-2, 3])
def test_view_rejects_bad_tp_scaled_dim(tp_scaled_dim: int) -> None:
    with pytest.raises(ValueError, match="tp_scaled_dim"):
        OPS.view(torch.randn(2, 5, 3, D), [2, 5, 3 * D], tp_scaled_dim)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize(
    ("shape", "tp_scaled_dim"), [([2, 5, 3 * D], -1), ([-1, D], -1), ([2, -1, 3, D], 2), ([10, 3, 2, 4], 1)]
)
def test_view_equals_reshape_and_copies(shape: list[int], tp_scaled_dim: int, transposed: bool) -> None:
    x = torch.randn(2, 5, 3, D)
    if transposed:
        x = x.transpose(1, 2)
    out = OPS.view(x, shape, tp_scaled_dim, "mha")
    assert torch.equal(out, x.reshape(shape))
    assert _storage(out) != _storage(x)


@pytest.mark.parametrize(("sizes", "dim"), [([3, 1, 4], -1), ([8], -1), ([2, 3], 1), ([1, 2], -2)])
def test_split_with_sizes_equals_split_and_copies(sizes: list[int], dim: int) -> None:
    x = torch.randn(2, 5, 3, D)
    out = OPS.split_with_sizes(x, sizes, dim, True, "mlp")
    expected = torch.split(x, sizes, dim=dim)
    assert all(torch.equal(o, e) for o, e in zip(out, expected, strict=True))
    assert len({_storage(t) for t in [x, *out]}) == len(out) + 1


def test_all_reduce_is_a_copy_before_sharding() -> None:
    x = torch.randn(2, 5, HIDDEN, dtype=torch.bfloat16)
    out = OPS.all_reduce(x, "mha")
    assert torch.equal(out, x) and out.dtype == x.dtype
    assert _storage(out) != _storage(x)


def _cases(dtype: torch.dtype) -> list[tuple[str, tuple]]:
    x = torch.randn(2, 5, HIDDEN, dtype=dtype)
    w, b = torch.randn(6, HIDDEN, dtype=dtype), torch.randn(6, dtype=dtype)
    return [
        ("torch_linear_simple", (x, w, b)),
        ("torch_linear_simple", (x, w, None, "colwise", [4, 2], 2, "mha")),
        ("view", (x, [2, 5, N, D], 2, "mha")),
        ("view", (x.transpose(0, 1), [-1, D], -1)),
        ("split_with_sizes", (x, [HIDDEN - 8, 8], -1, True, "mha")),
        ("all_reduce", (x, "mlp")),
    ]


@DTYPES
@pytest.mark.parametrize("index", range(6))
def test_opcheck(index: int, dtype: torch.dtype) -> None:
    name, args = _cases(dtype)[index]
    torch.library.opcheck(getattr(OPS, name).default, args)


@pytest.mark.parametrize("index", range(6))
def test_fake_matches_real(index: int) -> None:
    name, args = _cases(torch.bfloat16)[index]
    op = getattr(OPS, name)
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    real, fake = (list(t) if isinstance(t, (list, tuple)) else [t] for t in (real, fake))
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "torch_linear_simple",
            [
                ("input", None),
                ("weight", None),
                ("bias", None),
                ("tp_mode", "none"),
                ("output_sizes", None),
                ("tp_min_local_shape", 1),
                ("layer_type", "unknown"),
            ],
        ),
        ("view", [("x", None), ("shape", None), ("tp_scaled_dim", -1), ("layer_type", "unknown")]),
        (
            "split_with_sizes",
            [
                ("x", None),
                ("split_sizes", None),
                ("dim", -1),
                ("enable_sharding", False),
                ("layer_type", "unknown"),
            ],
        ),
        ("all_reduce", [("x", None), ("layer_type", "unknown")]),
    ],
)
def test_schema_matches_autodeploy(name: str, expected: list[tuple[str, object]]) -> None:
    schema = getattr(OPS, name).default._schema
    assert [(a.name, a.default_value) for a in schema.arguments] == expected


class _AttentionShapedBlock(torch.nn.Module):
    """Fused QKV projection, split, head reshapes (symbolic and -1), output projection, all-reduce."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(HIDDEN, HIDDEN + 2 * N_KV * D)
        self.o = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        sizes = [HIDDEN, N_KV * D, N_KV * D]
        qkv = OPS.torch_linear_simple(x, self.qkv.weight, self.qkv.bias, "colwise", sizes, D, "mha")
        q, k, v = OPS.split_with_sizes(qkv, sizes, -1, True, "mha")
        q = OPS.view(q, [b, s, N, D], 2, "mha")
        k = OPS.view(k, [b, -1, N_KV, D], 2, "mha")
        mixed = q + (k * v.view(b, s, N_KV, D)).repeat_interleave(N // N_KV, dim=2)
        out = OPS.torch_linear_simple(OPS.view(mixed, [b, s, -1]), self.o.weight, None, tp_mode="rowwise")
        return OPS.all_reduce(out, "mha")

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([HIDDEN, N_KV * D, N_KV * D], dim=-1)
        q, k, v = q.reshape(b, s, N, D), k.reshape(b, s, N_KV, D), v.reshape(b, s, N_KV, D)
        return self.o((q + (k * v).repeat_interleave(N // N_KV, dim=2)).reshape(b, s, -1))


def test_export_with_dynamic_batch_and_seq() -> None:
    block = _AttentionShapedBlock()
    dims = {0: Dim("batch", min=1, max=8), 1: Dim("seq", min=2, max=64)}
    exported = torch.export.export(block, (torch.randn(2, 5, HIDDEN),), dynamic_shapes=({**dims},))
    views = [n for n in exported.graph.nodes if n.target == OPS.view.default]
    assert len(views) == 3
    # the head reshape keeps symbolic batch/seq sizes instead of baking in 2 and 5
    assert any(isinstance(dim, torch.fx.Node) for dim in views[0].args[1])
    targets = {n.target for n in exported.graph.nodes}
    assert {OPS.torch_linear_simple.default, OPS.split_with_sizes.default, OPS.all_reduce.default} <= targets
    x = torch.randn(3, 11, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), block.reference(x))
