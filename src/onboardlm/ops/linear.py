"""Linear op with tensor-parallel sharding hints."""

import torch
import torch.nn.functional as F

from onboardlm.ops._library import canonical_op
from onboardlm.ops.sharding import check_hints


@canonical_op("torch_linear_simple")
def torch_linear_simple(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tp_mode: str = "none",
    output_sizes: list[int] | None = None,
    tp_min_local_shape: int = 1,
    layer_type: str = "unknown",
) -> torch.Tensor:
    """``F.linear(input, weight, bias)``; the hint arguments only guide the sharding pass.

    ``tp_mode``: ``"colwise"`` shards weight dim 0, ``"rowwise"`` dim 1, ``"none"`` replicates.
    ``output_sizes``: group sizes of a fused weight (e.g. ``[q, kv, kv]``), sharded proportionally.
    ``tp_min_local_shape``: smallest per-rank output width (head_dim for K/V under GQA).
    ``layer_type``: one of ``sharding.LAYER_TYPES``.
    """
    check_hints(tp_mode, layer_type)
    return F.linear(input, weight, bias)


@torch_linear_simple.register_fake
def _torch_linear_simple_fake(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tp_mode: str = "none",
    output_sizes: list[int] | None = None,
    tp_min_local_shape: int = 1,
    layer_type: str = "unknown",
) -> torch.Tensor:
    check_hints(tp_mode, layer_type)
    return F.linear(input, weight, bias)
