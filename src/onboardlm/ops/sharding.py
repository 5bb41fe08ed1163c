"""Sharding-hint ops: reshape, split and all-reduce that carry tensor-parallel metadata.

Unsharded, each behaves like its plain torch counterpart and returns fresh tensors (never an alias
of the input). The sharding pass reads the hint arguments to rewrite them for a TP rank: ``view``
divides ``shape[tp_scaled_dim]`` by the TP size, ``split_with_sizes`` with ``enable_sharding``
divides every split size, and ``all_reduce`` becomes a real collective.

The hint vocabularies shared by every op with hint arguments live here too.
"""

import torch

from onboardlm.ops._library import canonical_op

#: Allowed values of ``tp_mode``: shard weight dim 0, shard weight dim 1, or leave replicated.
TP_MODES: tuple[str, ...] = ("colwise", "rowwise", "none")

#: Allowed values of ``layer_type`` (selects which layers a sharding config touches). OPS.md lists the
#: first seven; ``lm_head`` is accepted too because TensorRT-LLM AutoDeploy model files pass it.
LAYER_TYPES: tuple[str, ...] = ("mha", "mla", "mlp", "moe", "ssm", "delta", "unknown", "lm_head")


def check_hints(tp_mode: str = "none", layer_type: str = "unknown") -> None:
    """Raise ValueError naming the argument when a hint value is outside its vocabulary."""
    if tp_mode not in TP_MODES:
        raise ValueError(f"tp_mode must be one of {TP_MODES}, got {tp_mode!r}")
    if layer_type not in LAYER_TYPES:
        raise ValueError(f"layer_type must be one of {LAYER_TYPES}, got {layer_type!r}")


def _check_scaled_dim(shape: list[int], tp_scaled_dim: int) -> None:
    if not -1 <= tp_scaled_dim < len(shape):
        raise ValueError(
            f"tp_scaled_dim must be -1 (not scaled) or an index into shape of length {len(shape)}, "
            f"got {tp_scaled_dim}"
        )


@canonical_op("view")
def view(
    x: torch.Tensor, shape: list[int], tp_scaled_dim: int = -1, layer_type: str = "unknown"
) -> torch.Tensor:
    """``x.reshape(shape)`` as a copy; the sharding pass divides ``shape[tp_scaled_dim]`` by the TP size.

    ``tp_scaled_dim=-1`` means no dimension is scaled (it is not a Python negative index).
    """
    check_hints(layer_type=layer_type)
    _check_scaled_dim(shape, tp_scaled_dim)
    return x.reshape(shape).clone()


@view.register_fake
def _view_fake(
    x: torch.Tensor, shape: list[int], tp_scaled_dim: int = -1, layer_type: str = "unknown"
) -> torch.Tensor:
    check_hints(layer_type=layer_type)
    _check_scaled_dim(shape, tp_scaled_dim)
    return x.reshape(shape).clone()


@canonical_op("split_with_sizes")
def split_with_sizes(
    x: torch.Tensor,
    split_sizes: list[int],
    dim: int = -1,
    enable_sharding: bool = False,
    layer_type: str = "unknown",
) -> list[torch.Tensor]:
    """``torch.split(x, split_sizes, dim)`` with every chunk copied.

    With ``enable_sharding`` the sharding pass divides every split size by the TP size.
    """
    check_hints(layer_type=layer_type)
    return [chunk.clone() for chunk in torch.split(x, split_sizes, dim=dim)]


@split_with_sizes.register_fake
def _split_with_sizes_fake(
    x: torch.Tensor,
    split_sizes: list[int],
    dim: int = -1,
    enable_sharding: bool = False,
    layer_type: str = "unknown",
) -> list[torch.Tensor]:
    check_hints(layer_type=layer_type)
    return [chunk.clone() for chunk in torch.split(x, split_sizes, dim=dim)]


@canonical_op("all_reduce")
def all_reduce(x: torch.Tensor, layer_type: str = "unknown") -> torch.Tensor:
    """A copy of ``x`` while unsharded; the sharding pass turns it into a sum over TP ranks."""
    check_hints(layer_type=layer_type)
    return x.clone()


@all_reduce.register_fake
def _all_reduce_fake(x: torch.Tensor, layer_type: str = "unknown") -> torch.Tensor:
    check_hints(layer_type=layer_type)
    return x.clone()
