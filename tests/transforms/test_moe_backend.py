"""The grouped MoE computes what the reference ``torch_moe`` computes, on each of its paths (CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from onboardlm.export import torch_export_to_gm
from onboardlm.ops.moe import ActivationType
from onboardlm.transforms.moe_backend import DENSE_MAX_TOKENS, grouped_moe, stack_experts, use_grouped_moe

E, K, H, INTER = 8, 2, 16, 12


def _experts(dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], ...]:
    gate_up = torch.randn(E, 2 * INTER, H, dtype=dtype)  # fused, as transformers 5 stores them
    gate, up = gate_up.chunk(2, dim=1)
    down = torch.randn(E, H, INTER, dtype=dtype)
    return [gate[e] for e in range(E)], [down[e] for e in range(E)], [up[e] for e in range(E)]


def _routing(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.randn(tokens, E).softmax(-1)
    weights, ids = scores.topk(K, dim=-1)
    ids[0, 1] = -1  # an invalid id is ignored, as by the reference
    return ids, weights / weights.sum(-1, keepdim=True)


def _float64_reference(x, ids, weights, w1, w2, w3) -> torch.Tensor:
    """Independent per-token loop in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for slot in range(K):
            e = int(ids[t, slot])
            if 0 <= e < E:
                h = x[t].double()
                inner = torch.nn.functional.silu(w1[e].double() @ h) * (w3[e].double() @ h)
                out[t] += weights[t, slot].double() * (w2[e].double() @ inner)
    return out


@pytest.mark.parametrize(
    "tokens", [1, 3, 40, DENSE_MAX_TOKENS + 1], ids=["gather", "gather3", "dense", "loop"]
)
def test_grouped_moe_equals_a_float64_expert_loop(tokens: int) -> None:
    w1, w2, w3 = _experts()
    x = torch.randn(tokens, H)
    ids, weights = _routing(tokens)
    got = grouped_moe(x, ids, weights, *(stack_experts(w) for w in (w1, w2, w3)))
    expected = _float64_reference(x, ids, weights, w1, w2, w3)
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)


def test_stacking_slices_of_a_fused_tensor_makes_a_view() -> None:
    w1, w2, _ = _experts()
    for weights in (w1, w2):
        stacked = stack_experts(weights)
        assert stacked.untyped_storage().data_ptr() == weights[0].untyped_storage().data_ptr()
        assert all(torch.equal(stacked[e], weights[e]) for e in range(E))
    separate = [torch.randn(INTER, H) for _ in range(E)]
    assert torch.equal(stack_experts(separate), torch.stack(separate))


class _Moe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        w1, w2, w3 = _experts()
        self.w1, self.w2, self.w3 = (
            nn.ParameterList(nn.Parameter(w.clone()) for w in ws) for ws in (w1, w2, w3)
        )

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_moe(
            x, ids, weights, list(self.w1), list(self.w2), list(self.w3), act_fn=int(ActivationType.Silu)
        )


def test_graph_pass_replaces_torch_moe_and_keeps_the_output() -> None:
    module = _Moe()
    ids, weights = _routing(4)
    x = torch.randn(4, H)
    gm = torch_export_to_gm(module, args=(x, ids, weights))
    expected = gm(x, ids, weights)
    assert use_grouped_moe(gm) == 1
    assert not any("torch_moe" in str(n.target) for n in gm.graph.nodes)
    assert sum(n.op == "get_attr" for n in gm.graph.nodes) == 3
    held = dict(gm.named_parameters()) | dict(gm.named_buffers())
    assert sorted(held) == sorted(
        str(n.target) for n in gm.graph.nodes if n.op == "get_attr"
    )  # no experts kept
    torch.testing.assert_close(gm(x, ids, weights), expected, rtol=1e-5, atol=1e-5)
