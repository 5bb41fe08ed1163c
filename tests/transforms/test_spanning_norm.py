"""The gated RMSNorm rewritten for groups that span ranks equals ``torch_rmsnorm_gated`` (one gloo rank).

With one rank the all-reduce adds nothing, so the rewrite must give the op's numbers; a rank's slot
among several groups (zero-padded, then read back) must not change them either. The two-rank sums
are checked end to end in ``test_sharding.py`` (Bamba with one B/C group at TP=2 equals TP=1).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from onboardlm.export import torch_export_to_gm
from onboardlm.transforms.spanning_norm import replace_spanning_gated_norm

CHANNELS = 16


class _Norm(nn.Module):
    def __init__(self, gated: bool, norm_before_gate: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(CHANNELS))
        self.gated, self.norm_before_gate = gated, norm_before_gate

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm_gated(
            x,
            self.weight,
            gate if self.gated else None,
            1e-5,
            CHANNELS,
            self.norm_before_gate,
            tp_mode="colwise",
            layer_type="ssm",
        )


@pytest.mark.parametrize(("gated", "norm_before_gate"), [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize(("slot", "slots"), [(0, 1), (1, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rewrite_equals_the_op(
    tmp_path: Path, gated: bool, norm_before_gate: bool, slot: int, slots: int, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    module = _Norm(gated, norm_before_gate)
    x, gate = (torch.randn(2, 5, CHANNELS, dtype=dtype) for _ in range(2))
    expected = module(x, gate)
    gm = torch_export_to_gm(module, (x, gate))
    (node,) = [n for n in gm.graph.nodes if n.target == torch.ops.auto_deploy.torch_rmsnorm_gated.default]
    dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    try:
        replace_spanning_gated_norm(gm, node, slot, slots, dist.group.WORLD.group_name)
        gm.recompile()
        actual = gm(x, gate)
    finally:
        dist.destroy_process_group()
    assert not any(n.target == node.target for n in gm.graph.nodes)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
