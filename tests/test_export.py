"""torch_export_to_gm: dynamic shapes, equality with eager, and load hooks carried onto the graph."""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule

from onboardlm.export import carry_load_hooks, torch_export_to_gm


class PackedExperts(nn.Module):
    """Per-expert linears whose checkpoint stores them packed as one 3-D tensor (unpacked by a hook)."""

    def __init__(self, num_experts: int = 3, width: int = 4) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(num_experts))
        self._register_load_state_dict_pre_hook(self._unpack)

    @staticmethod
    def _unpack(state_dict: dict, prefix: str, *args: object) -> None:
        packed = state_dict.pop(f"{prefix}packed_weight", None)
        if packed is not None:
            for i, weight in enumerate(packed.unbind(0)):
                state_dict[f"{prefix}experts.{i}.weight"] = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(expert(x) for expert in self.experts)


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = PackedExperts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x).softmax(-1)


def test_export_is_a_graph_module_equal_to_eager_at_two_shapes() -> None:
    model = Wrapper().eval()
    x = torch.randn(2, 5, 4)
    dynamic = {"x": {0: Dim("batch", max=32), 1: Dim("seq", max=128)}}
    gm = torch_export_to_gm(model, args=(x,), dynamic_shapes=dynamic)
    assert isinstance(gm, GraphModule)
    torch.testing.assert_close(gm(x), model(x))
    other = torch.randn(7, 3, 4)
    torch.testing.assert_close(gm(other), model(other))


def test_load_hooks_are_carried_onto_the_graph_module() -> None:
    model = Wrapper().eval()
    gm = torch_export_to_gm(model, args=(torch.randn(2, 5, 4),))
    packed = torch.randn(3, 4, 4)
    gm.load_state_dict({"block.packed_weight": packed}, strict=True)
    for i in range(3):
        torch.testing.assert_close(gm.get_parameter(f"block.experts.{i}.weight"), packed[i])


def test_hook_of_a_folded_module_sees_its_own_prefix() -> None:
    source, target = Wrapper(), nn.Module()
    target.register_parameter("unrelated", nn.Parameter(torch.zeros(1)))
    target.block = nn.Module()  # 'block' survives, but nothing else does below the root
    del target.block
    assert carry_load_hooks(source, target) == 1
    state = {"block.packed_weight": torch.ones(3, 4, 4)}
    target._load_state_dict_pre_hooks[next(iter(target._load_state_dict_pre_hooks))](
        state, "", {}, True, [], [], []
    )
    assert sorted(state) == ["block.experts.0.weight", "block.experts.1.weight", "block.experts.2.weight"]
