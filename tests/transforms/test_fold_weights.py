"""Weight-only computations are done once: same logits, fewer nodes, no second copy of the weights."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig

from onboardlm.export import torch_export_to_gm
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.runtime.engine import build_cached_graph
from onboardlm.testing import tiny_config
from onboardlm.testing.cached import prefill_then_decode, zero_caches
from onboardlm.transforms.fold_weights import fold_weight_computations

BATCH, SEQ = 2, 7


def _prefill_and_decode(graph, ids: torch.Tensor) -> torch.Tensor:
    return prefill_then_decode(graph.gm, zero_caches(graph, BATCH, SEQ), ids, SEQ - 1)


def _targets(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_gpt_oss_expert_stacking_runs_once() -> None:
    """GPT-OSS's lean file stacks its per-expert weights in ``forward``: folded, the steps only read them."""
    config = tiny_config(AutoConfig.for_model("gpt_oss"))
    torch.manual_seed(0)
    model = AutoModelForCausalLMFactory(config).build_model()
    graph = build_cached_graph(model)
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ))
    expected = _prefill_and_decode(graph, ids)
    calls_before = len(_targets(graph.gm))
    assert any("stack" in t for t in _targets(graph.gm))

    assert fold_weight_computations(graph.gm) > 0

    assert not any("stack" in t for t in _targets(graph.gm))
    assert len(_targets(graph.gm)) < calls_before
    names = dict(graph.gm.named_parameters()) | dict(graph.gm.named_buffers())
    assert not any(".experts.0." in name for name in names), "the per-expert copies must be gone"
    torch.testing.assert_close(_prefill_and_decode(graph, ids), expected, rtol=0, atol=0)
    code = graph.gm.code
    assert fold_weight_computations(graph.gm) == 0 and graph.gm.code == code


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(4, 3))
        self.b = nn.Parameter(torch.randn(4, 3))
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = torch.cat([self.a, self.b * 2]).t()  # weights only: folded into one tensor
        self.steps.add_(1)  # in place: must stay a step of the graph
        return torch.cat([x @ both, x * self.a.sum()], dim=-1)  # a.sum(): folded too


def test_only_pure_tensor_computations_on_weights_are_folded() -> None:
    toy = _Toy()
    x = torch.randn(2, 3)
    gm = torch_export_to_gm(toy, args=(x,))
    expected = toy(x)
    toy.steps.zero_()
    folded = fold_weight_computations(gm)
    assert folded >= 4  # mul, cat, t and sum
    targets = _targets(gm)
    assert targets.count("aten.cat.default") == 1 and "aten.t.default" not in targets  # the output's cat
    assert "aten.add_.Tensor" in targets
    torch.testing.assert_close(gm(x), expected)
    steps = [b for name, b in gm.named_buffers() if name.endswith("steps")]
    assert steps and float(steps[0]) >= 1  # the in-place update still ran
    assert not hasattr(gm, "b"), "a weight read only by folded nodes is dropped"
