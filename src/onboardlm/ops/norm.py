"""Normalisation ops: RMSNorm, grouped gated RMSNorm and L2 norm, all computed in fp32."""

import torch
import torch.nn.functional as F

from onboardlm.ops._library import canonical_op
from onboardlm.ops.sharding import check_hints


@canonical_op("torch_rmsnorm")
def torch_rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x², -1) + eps))`` with the norm in fp32, returned in the input dtype.

    The normalised value is cast to the input dtype before the weight multiply (as HF Llama does);
    there is no ``1 + weight`` offset.
    """
    dtype = input.dtype
    x = input.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * x.to(dtype)).to(dtype)


@torch_rmsnorm.register_fake
def _torch_rmsnorm_fake(input: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(input)


def _check_group_size(hidden: int, group_size: int) -> None:
    if group_size <= 0 or hidden % group_size:
        raise ValueError(f"group_size must be a positive divisor of the last dim {hidden}, got {group_size}")


@canonical_op("torch_rmsnorm_gated")
def torch_rmsnorm_gated(
    x: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor | None,
    eps: float,
    group_size: int,
    norm_before_gate: bool = False,
    tp_mode: str = "none",
    layer_type: str = "unknown",
) -> torch.Tensor:
    """Grouped RMSNorm over chunks of ``group_size`` channels, with an optional SiLU gate, in fp32.

    ``norm_before_gate=False`` (Mamba2): ``norm(x * silu(gate)) * weight``;
    ``norm_before_gate=True``: ``norm(x) * weight * silu(gate)``. Returns the dtype of ``x``.
    ``tp_mode`` and ``layer_type`` are sharding hints and change nothing numerically.
    """
    check_hints(tp_mode, layer_type)
    _check_group_size(x.shape[-1], group_size)
    dtype = x.dtype
    h = x.float()
    z = None if gate is None else F.silu(gate.float())
    if z is not None and not norm_before_gate:
        h = h * z
    grouped = h.unflatten(-1, (-1, group_size))
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    out = grouped.flatten(-2) * weight.float()
    if z is not None and norm_before_gate:
        out = out * z
    return out.to(dtype)


@torch_rmsnorm_gated.register_fake
def _torch_rmsnorm_gated_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor | None,
    eps: float,
    group_size: int,
    norm_before_gate: bool = False,
    tp_mode: str = "none",
    layer_type: str = "unknown",
) -> torch.Tensor:
    check_hints(tp_mode, layer_type)
    _check_group_size(x.shape[-1], group_size)
    return torch.empty_like(x)


@canonical_op("torch_l2norm")
def torch_l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x * rsqrt(sum(x², -1) + eps)`` in fp32, returned in the input dtype."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


@torch_l2norm.register_fake
def _torch_l2norm_fake(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return torch.empty_like(x)
