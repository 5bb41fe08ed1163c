"""MoE ops against transformers' expert blocks and float64 references written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim
from transformers import GptOssConfig, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from onboardlm.ops.moe import ActivationType
from onboardlm.testing.metrics import assert_rmse_close

OPS = torch.ops.auto_deploy
H, INTER, E, K = 16, 8, 4, 2
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
MOE_RMSE = 0.02  # DESIGN.md tolerance for MoE blocks (bf16)

ACT_F64 = {
    ActivationType.Silu: F.silu,
    ActivationType.Swiglu: F.silu,
    ActivationType.Relu2: lambda t: F.relu(t) ** 2,
    ActivationType.Gelu: lambda t: 0.5 * t * (1.0 + torch.erf(t / 2.0**0.5)),
}


def _experts(
    num: int = E, gated: bool = True, dtype: torch.dtype = torch.float32
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    w1 = [(0.3 * torch.randn(INTER, H)).to(dtype) for _ in range(num)]
    w2 = [(0.3 * torch.randn(H, INTER)).to(dtype) for _ in range(num)]
    w3 = [(0.3 * torch.randn(INTER, H)).to(dtype) for _ in range(num)] if gated else []
    return w1, w2, w3


def _routing(num_tokens: int, num_experts: int = E) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(num_experts)[:K] for _ in range(num_tokens)])
    return ids, torch.softmax(torch.randn(num_tokens, K), dim=-1)


def _moe_f64(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w1: list[torch.Tensor],
    w2: list[torch.Tensor],
    w3: list[torch.Tensor],
    act_fn: ActivationType = ActivationType.Silu,
    gated: bool = True,
    on_input: bool = False,
) -> torch.Tensor:
    """Token-by-token float64 MoE; ids outside ``[0, len(w1))`` contribute nothing."""
    act = ACT_F64[act_fn]
    flat = x.reshape(-1, x.shape[-1]).double()
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for slot in range(ids.shape[-1]):
            e, w = int(ids[t, slot]), float(weights[t, slot])
            if not 0 <= e < len(w1):
                continue
            h = flat[t] * w if on_input else flat[t]
            inner = act(w1[e].double() @ h)
            if gated:
                inner = inner * (w3[e].double() @ h)
            y = w2[e].double() @ inner
            out[t] += y if on_input else w * y
    return out.reshape(x.shape)


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 3e-2, "atol": 3e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}


def test_activation_type_matches_tensorrt_llm_values() -> None:
    # tensorrt_llm ActivationType: Gelu=2, Silu=4, Swiglu=5, Relu2=8
    assert {a.name: int(a) for a in ActivationType} == {"Gelu": 2, "Silu": 4, "Swiglu": 5, "Relu2": 8}
    assert OPS.torch_moe.default._schema.arguments[7].default_value == 4


@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("act_fn", list(ActivationType))
@pytest.mark.parametrize("shape", [(6, H), (2, 3, H)])
@DTYPES
def test_torch_moe_matches_float64(
    shape: tuple[int, ...], act_fn: ActivationType, gated: bool, on_input: bool, dtype: torch.dtype
) -> None:
    x = torch.randn(shape, dtype=dtype)
    ids, weights = _routing(x.numel() // H)
    w1, w2, w3 = _experts(gated=gated, dtype=dtype)
    out = OPS.torch_moe(x, ids, weights, w1, w2, w3, gated, act_fn, apply_routing_on_input=on_input)
    assert (out.shape, out.dtype) == (x.shape, dtype)
    expected = _moe_f64(x, ids, weights, w1, w2, w3, act_fn, gated, on_input)
    torch.testing.assert_close(out.double(), expected, **_tol(dtype))


def test_routing_on_input_differs_from_routing_on_output() -> None:
    x, (ids, weights), (w1, w2, w3) = torch.randn(4, H), _routing(4), _experts()
    on_out = OPS.torch_moe(x, ids, weights, w1, w2, w3)
    on_in = OPS.torch_moe(x, ids, weights, w1, w2, w3, apply_routing_on_input=True)
    assert not torch.allclose(on_in, on_out, atol=1e-3)


@pytest.mark.parametrize("bad_id", [-1, E, E + 3])
def test_out_of_range_expert_ids_are_ignored(bad_id: int) -> None:
    x, (ids, weights), (w1, w2, w3) = torch.randn(5, H), _routing(5), _experts()
    ids[::2, 1] = bad_id  # expert-parallel masking marks non-local experts this way
    out = OPS.torch_moe(x, ids, weights, w1, w2, w3)
    torch.testing.assert_close(out.double(), _moe_f64(x, ids, weights, w1, w2, w3), **_tol(x.dtype))
    all_masked = OPS.torch_moe(x, torch.full_like(ids, bad_id), weights, w1, w2, w3)
    assert torch.equal(all_masked, torch.zeros_like(x))


def test_experts_without_tokens_are_fine_and_unused() -> None:
    x, (w1, w2, w3) = torch.randn(5, H), _experts(num=6)
    ids = torch.tensor([[0, 2]] * 5)
    weights = torch.softmax(torch.randn(5, K), dim=-1)
    out = OPS.torch_moe(x, ids, weights, w1, w2, w3)
    torch.testing.assert_close(out.double(), _moe_f64(x, ids, weights, w1, w2, w3), **_tol(x.dtype))
    unused = [1, 3, 4, 5]
    for e in unused:
        w1[e], w2[e], w3[e] = torch.full_like(w1[e], float("nan")), w2[e] * 7.0, w3[e] * 7.0
    assert torch.equal(OPS.torch_moe(x, ids, weights, w1, w2, w3), out)


def test_zero_tokens() -> None:
    w1, w2, w3 = _experts()
    out = OPS.torch_moe(torch.randn(0, H), torch.zeros(0, K, dtype=torch.long), torch.zeros(0, K), w1, w2, w3)
    assert out.shape == (0, H)


def test_int32_ids_and_fp32_weights_with_bf16_input() -> None:
    # DeepSeek-style: router gives int32 ids and fp32 weights, activations and experts are bf16
    x, (ids, weights), (w1, w2, w3) = torch.randn(6, H, dtype=torch.bfloat16), _routing(6), _experts()
    w1, w2, w3 = ([w.bfloat16() for w in ws] for ws in (w1, w2, w3))
    out = OPS.torch_moe(x, ids.int(), weights, w1, w2, w3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), _moe_f64(x, ids, weights, w1, w2, w3), **_tol(torch.bfloat16))


def test_accumulates_in_fp32() -> None:
    # expert e outputs exactly c_e; summed in bf16, 256 + 1 + 1 would stay 256 (spacing 2 above 256)
    x = torch.ones(1, 1, dtype=torch.bfloat16)
    w1 = [torch.ones(1, 1, dtype=torch.bfloat16)] * 3
    w2 = [torch.tensor([[c]], dtype=torch.bfloat16) for c in (256.0, 1.0, 1.0)]
    ids, weights = torch.tensor([[0, 1, 2]]), torch.ones(1, 3)
    out = OPS.torch_moe(x, ids, weights, w1, w2, [], False, ActivationType.Relu2)
    assert out.item() == 258.0


def test_enum_and_int_act_fn_agree() -> None:
    x, (ids, weights), (w1, w2, _) = torch.randn(4, H), _routing(4), _experts(gated=False)
    by_enum = OPS.torch_moe(x, ids, weights, w1, w2, [], is_gated_mlp=False, act_fn=ActivationType.Relu2)
    by_int = OPS.torch_moe(x, ids, weights, w1, w2, [], is_gated_mlp=False, act_fn=8)
    assert torch.equal(by_enum, by_int)


def test_hints_change_nothing() -> None:
    x, (ids, weights), (w1, w2, w3) = torch.randn(4, H), _routing(4), _experts()
    plain = OPS.torch_moe(x, ids, weights, w1, w2, w3)
    hinted = OPS.torch_moe(
        x, ids, weights, w1, w2, w3, mapping_config="{}", max_num_tokens=64, layer_type="unknown"
    )
    assert torch.equal(plain, hinted)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"act_fn": 3}, "act_fn"),
        ({"layer_type": "experts"}, "layer_type"),
        ({"w3_weight": []}, "w3_weight"),
        ({"w2_weight": []}, "w2_weight"),
    ],
)
def test_torch_moe_rejects_bad_arguments(kwargs: dict[str, object], argument: str) -> None:
    x, (ids, weights), (w1, w2, w3) = torch.randn(4, H), _routing(4), _experts()
    args = {"w1_weight": w1, "w2_weight": w2, "w3_weight": w3, **kwargs}
    with pytest.raises(ValueError, match=argument):
        OPS.torch_moe(x, ids, weights, **args)


def test_torch_moe_rejects_mismatched_routing_shape() -> None:
    w1, w2, w3 = _experts()
    with pytest.raises(ValueError, match="selected_experts"):
        OPS.torch_moe(torch.randn(4, H), torch.zeros(3, K, dtype=torch.long), torch.ones(3, K), w1, w2, w3)


# --- transformers expert blocks ---------------------------------------------------------------


def _randomise(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module.eval()


def _unpack(experts: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """HF packs ``gate_up_proj`` as ``(E, 2I, H)`` (gate rows first) and ``down_proj`` as ``(E, H, I)``."""
    gate, up = experts.gate_up_proj.chunk(2, dim=1)
    return list(gate.unbind(0)), list(experts.down_proj.unbind(0)), list(up.unbind(0))


def _check_block(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    if dtype == torch.bfloat16:
        assert_rmse_close(out, expected, MOE_RMSE)
    else:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@DTYPES
def test_mixtral_sparse_moe_block(dtype: torch.dtype) -> None:
    config = MixtralConfig(hidden_size=H, intermediate_size=INTER, num_local_experts=E, num_experts_per_tok=K)
    block = _randomise(MixtralSparseMoeBlock(config)).to(dtype)
    x = torch.randn(2, 5, H, dtype=dtype)
    with torch.no_grad():
        expected = block(x)
        _, weights, ids = block.gate(x)
        out = OPS.torch_moe(x.reshape(-1, H), ids, weights, *_unpack(block.experts)).reshape(x.shape)
    _check_block(out, expected, dtype)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@DTYPES
def test_qwen3_moe_sparse_moe_block(dtype: torch.dtype, norm_topk_prob: bool) -> None:
    config = Qwen3MoeConfig(
        hidden_size=H,
        moe_intermediate_size=INTER,
        num_experts=E,
        num_experts_per_tok=K,
        norm_topk_prob=norm_topk_prob,
    )
    block = _randomise(Qwen3MoeSparseMoeBlock(config)).to(dtype)
    x = torch.randn(2, 5, H, dtype=dtype)
    with torch.no_grad():
        expected = block(x)
        # the router in plain torch, as a lean model file writes it
        probs = torch.softmax(F.linear(x.reshape(-1, H), block.gate.weight), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, K, dim=-1)
        if norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        out = OPS.torch_moe(x, ids, weights.to(dtype), *_unpack(block.experts), layer_type="moe")
    _check_block(out, expected, dtype)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@DTYPES
def test_qwen2_moe_sparse_moe_block_with_shared_expert(dtype: torch.dtype, norm_topk_prob: bool) -> None:
    config = Qwen2MoeConfig(
        hidden_size=H,
        moe_intermediate_size=INTER,
        shared_expert_intermediate_size=12,
        num_experts=E,
        num_experts_per_tok=K,
        norm_topk_prob=norm_topk_prob,
    )
    block = _randomise(Qwen2MoeSparseMoeBlock(config)).to(dtype)
    x = torch.randn(3, 4, H, dtype=dtype)
    with torch.no_grad():
        expected = block(x)
        _, weights, ids = block.gate(x)
        routed = OPS.torch_moe(x, ids, weights, *_unpack(block.experts))
        se = block.shared_expert
        shared = se.down_proj(F.silu(se.gate_proj(x)) * se.up_proj(x))
        out = routed + torch.sigmoid(block.shared_expert_gate(x)) * shared
    _check_block(out, expected, dtype)


# --- GPT-OSS router and dense experts ---------------------------------------------------------


def _gpt_oss_block(dtype: torch.dtype) -> GptOssMLP:
    config = GptOssConfig(hidden_size=H, intermediate_size=INTER, num_local_experts=E, num_experts_per_tok=K)
    block = _randomise(GptOssMLP(config))
    with torch.no_grad():  # large enough that the gate/up clamps at swiglu_limit (7.0) are reached
        block.experts.gate_up_proj.mul_(10.0)
    return block.to(dtype)


def _dense_args(block: GptOssMLP) -> tuple[torch.Tensor, ...]:
    ex = block.experts
    return ex.gate_up_proj, ex.gate_up_proj_bias, ex.down_proj, ex.down_proj_bias


@DTYPES
def test_gpt_oss_mlp_from_router_and_dense_mlp(dtype: torch.dtype) -> None:
    block = _gpt_oss_block(dtype)
    x = torch.randn(2, 5, H, dtype=dtype)
    with torch.no_grad():
        expected, _ = block(x)
        gate_up = x.reshape(-1, H) @ block.experts.gate_up_proj + block.experts.gate_up_proj_bias[:, None]
        assert (gate_up.abs() > block.experts.limit).any(), "test inputs must exercise the clamps"
        scores = OPS.torch_moe_router(x, block.router.weight, block.router.bias, K)
        out = OPS.torch_moe_dense_mlp(
            x, scores, *_dense_args(block), alpha=block.experts.alpha, limit=block.experts.limit
        )
    assert out.shape == x.shape
    _check_block(out, expected, dtype)


@pytest.mark.parametrize("shape", [(7, H), (2, 3, H)])
@DTYPES
def test_router_matches_gpt_oss_router(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    block = _gpt_oss_block(dtype)
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        _, top_scores, top_ids = block.router(x.reshape(-1, H))
        scores = OPS.torch_moe_router(x, block.router.weight, block.router.bias, K)
    expected = torch.zeros(x.numel() // H, E, dtype=dtype).scatter(1, top_ids, top_scores)
    assert scores.dtype == dtype
    torch.testing.assert_close(scores, expected)


@pytest.mark.parametrize("top_k", [1, 3])
def test_router_matches_float64(top_k: int) -> None:
    x, weight, bias = torch.randn(6, H), torch.randn(E, H), torch.randn(E)
    scores = OPS.torch_moe_router(x, weight, bias, top_k)
    logits = x.double() @ weight.double().T + bias.double()
    expected = torch.zeros_like(logits)
    for t in range(logits.shape[0]):
        top = logits[t].argsort(descending=True)[:top_k]
        expected[t, top] = torch.exp(logits[t, top]) / torch.exp(logits[t, top]).sum()
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [0, E + 1])
def test_router_rejects_bad_top_k(top_k: int) -> None:
    with pytest.raises(ValueError, match="top_k"):
        OPS.torch_moe_router(torch.randn(2, H), torch.randn(E, H), torch.randn(E), top_k)


@pytest.mark.parametrize(("alpha", "limit"), [(1.0, 10.0), (1.702, 0.5)])
@pytest.mark.parametrize("shape", [(5, H), (2, 3, H)])
def test_dense_mlp_matches_float64(shape: tuple[int, ...], alpha: float, limit: float) -> None:
    x = torch.randn(shape)
    routing = torch.softmax(torch.randn(x.numel() // H, E), dim=-1)
    gate_up_w, gate_up_b = torch.randn(E, H, 2 * INTER), torch.randn(E, 2 * INTER)
    down_w, down_b = 0.3 * torch.randn(E, INTER, H), torch.randn(E, H)
    out = OPS.torch_moe_dense_mlp(x, routing, gate_up_w, gate_up_b, down_w, down_b, alpha, limit)
    flat = x.reshape(-1, H).double()
    expected = torch.zeros_like(flat)
    for e in range(E):
        gu = flat @ gate_up_w[e].double() + gate_up_b[e].double()
        gate, up = gu[:, 0::2].clamp(max=limit), gu[:, 1::2].clamp(-limit, limit)
        y = ((up + 1) * gate * torch.sigmoid(alpha * gate)) @ down_w[e].double() + down_b[e].double()
        expected += routing[:, e : e + 1].double() * y
    assert out.shape == x.shape
    torch.testing.assert_close(out.double(), expected.reshape(shape), rtol=1e-4, atol=1e-4)


# --- op contract: opcheck, fake kernels, aliasing, export -------------------------------------


def _cases(dtype: torch.dtype) -> list[tuple[str, tuple]]:
    x3 = torch.randn(2, 3, H, dtype=dtype)
    ids, weights = _routing(6)
    ids[0, 0] = -1
    gated, plain = _experts(dtype=dtype), _experts(gated=False, dtype=dtype)
    gate_up_w, gate_up_b = torch.randn(E, H, 2 * INTER, dtype=dtype), torch.randn(E, 2 * INTER, dtype=dtype)
    down_w, down_b = torch.randn(E, INTER, H, dtype=dtype), torch.randn(E, H, dtype=dtype)
    routing = torch.softmax(torch.randn(6, E), dim=-1).to(dtype)
    return [
        ("torch_moe", (x3.reshape(6, H), ids, weights, *gated)),
        ("torch_moe", (x3, ids.int(), weights, *plain, False, int(ActivationType.Relu2), "", 0, True, "moe")),
        ("torch_moe", (x3, ids, weights, *gated, True, int(ActivationType.Gelu))),
        ("torch_moe_router", (x3, torch.randn(E, H, dtype=dtype), torch.randn(E, dtype=dtype), K)),
        ("torch_moe_dense_mlp", (x3, routing, gate_up_w, gate_up_b, down_w, down_b, 1.702, 7.0)),
    ]


@DTYPES
@pytest.mark.parametrize("index", range(5))
def test_opcheck(index: int, dtype: torch.dtype) -> None:
    name, args = _cases(dtype)[index]
    torch.library.opcheck(getattr(OPS, name).default, args)


@pytest.mark.parametrize("index", range(5))
def test_fake_matches_real_and_no_alias(index: int) -> None:
    name, args = _cases(torch.bfloat16)[index]
    op = getattr(OPS, name)
    real = op(*args)

    def fake_of(a: object, mode: FakeTensorMode) -> object:
        if isinstance(a, list):
            return [mode.from_tensor(t) for t in a]
        return mode.from_tensor(a) if isinstance(a, torch.Tensor) else a

    with FakeTensorMode() as mode:
        fake = op(*(fake_of(a, mode) for a in args))
    assert (fake.shape, fake.dtype) == (real.shape, real.dtype)
    inputs = [t for a in args for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor)]
    assert all(real.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in inputs)


class _TinyMoe(nn.Module):
    """Softmax top-k router in plain torch feeding ``torch_moe``, as a lean model file writes it."""

    def __init__(self, act_fn: ActivationType) -> None:
        super().__init__()
        self.act_fn = act_fn
        self.gate = nn.Linear(H, E, bias=False)
        w1, w2, w3 = _experts()
        self.w1, self.w2, self.w3 = (nn.ParameterList(ws) for ws in (w1, w2, w3))

    def _route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = torch.topk(torch.softmax(self.gate(flat), dim=-1), K, dim=-1)
        return ids, weights / weights.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, H)
        experts = list(self.w1), list(self.w2), list(self.w3)
        return OPS.torch_moe(flat, *self._route(flat), *experts, act_fn=self.act_fn).reshape(x.shape)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, H)
        experts = list(self.w1), list(self.w2), list(self.w3)
        return _moe_f64(flat, *self._route(flat), *experts, self.act_fn).reshape(x.shape).float()


@pytest.mark.parametrize("act_fn", [ActivationType.Silu, ActivationType.Relu2])
def test_export_torch_moe_with_dynamic_tokens(act_fn: ActivationType) -> None:
    block = _TinyMoe(act_fn).eval()
    dims = {0: Dim("batch", min=1, max=8), 1: Dim("seq", min=1, max=64)}
    with torch.no_grad():
        exported = torch.export.export(block, (torch.randn(2, 5, H),), dynamic_shapes=(dims,))
        assert OPS.torch_moe.default in {n.target for n in exported.graph.nodes}
        for shape in [(3, 7, H), (1, 1, H)]:
            x = torch.randn(shape)
            torch.testing.assert_close(exported.module()(x), block.reference(x), rtol=1e-5, atol=1e-5)


def test_export_gpt_oss_router_and_dense_mlp_with_dynamic_tokens() -> None:
    block = _gpt_oss_block(torch.float32)

    class _Lean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = block

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            router, ex = self.block.router, self.block.experts
            scores = OPS.torch_moe_router(x, router.weight, router.bias, K)
            return OPS.torch_moe_dense_mlp(x, scores, *_dense_args(self.block), ex.alpha, ex.limit)

    dims = {0: Dim("batch", min=1, max=8), 1: Dim("seq", min=1, max=64)}
    with torch.no_grad():
        exported = torch.export.export(_Lean(), (torch.randn(2, 5, H),), dynamic_shapes=(dims,))
        x = torch.randn(3, 9, H)
        torch.testing.assert_close(exported.module()(x), block(x)[0], rtol=1e-5, atol=1e-5)
