"""Process groups for tensor parallelism and rank-local loading of sharded weights.

A TP run starts one process per rank (``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``; tests pass a ``file://`` init method). Each rank exports the lean
model, shards it with :func:`onboardlm.transforms.sharding.apply_sharding_hints`, then reads only its
slices of the checkpoint with :func:`load_rank_weights`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from onboardlm.errors import WeightsError
from onboardlm.transforms.sharding import ParamShard, ShardingError, check_devices


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the TP group."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> RankInfo:
        """Read the variables ``torchrun`` sets; a plain process is rank 0 of 1."""
        try:
            rank = int(os.environ.get("RANK", "0"))
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as err:
            raise ShardingError("RANK/WORLD_SIZE/LOCAL_RANK", f"not an integer: {err}") from err
        return cls(rank, world_size, local_rank)


def rank_device(info: RankInfo, device_type: str) -> torch.device:
    """The device a rank computes on: its own accelerator by local rank, or the CPU."""
    check_devices(info.world_size, torch.device(device_type))
    return torch.device("cpu") if device_type == "cpu" else torch.device(device_type, info.local_rank)


@contextmanager
def process_group(info: RankInfo, device_type: str = "cpu", init_method: str = "env://") -> Iterator[None]:
    """Initialise the default process group (NCCL on CUDA, else gloo) for the block, then destroy it.

    Nothing is created for a world size of 1. Device checks run before the group is created.
    """
    device = rank_device(info, device_type)
    if info.world_size == 1:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=info.rank, world_size=info.world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _open_all(files: Sequence[Path], stack: ExitStack) -> dict[str, Any]:
    """Checkpoint key -> open safetensors handle of the file holding it."""
    index: dict[str, Any] = {}
    for file in files:
        if not Path(file).is_file():
            raise WeightsError(str(file), "checkpoint shard is missing", "re-download the checkpoint")
        handle = stack.enter_context(safe_open(file, framework="pt"))
        index.update(dict.fromkeys(handle.keys(), handle))
    return index


def _read(handle: Any, key: str, shard: ParamShard | None) -> torch.Tensor:
    """Read ``key`` whole, or only the ranges of ``shard`` (via ``get_slice``, no full copy)."""
    if shard is None:
        return handle.get_tensor(key)
    lazy = handle.get_slice(key)
    lead = (slice(None),) * shard.dim
    return torch.cat([lazy[(*lead, slice(a, b))] for a, b in shard.ranges], dim=shard.dim)


def _run_load_pre_hooks(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Run ``model``'s load-state-dict pre-hooks on ``state_dict`` (e.g. unpacking fused experts)."""
    for name, module in model.named_modules():
        for hook in module._load_state_dict_pre_hooks.values():
            hook(state_dict, f"{name}." if name else "", {}, True, [], [], [])


def load_rank_weights(
    model: nn.Module,
    files: Sequence[Path],
    shards: Mapping[str, ParamShard],
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """Fill ``model`` (already sharded) from safetensors ``files``, reading only this rank's slices.

    Tensors whose checkpoint key equals a model key are read slice-wise. Checkpoint tensors under other
    keys (packed layouts that a load hook converts) are read whole, passed through the model's load
    pre-hooks, then cut. Tied parameters are filled through whichever of their names the checkpoint
    has: the model's own, or one of its ``aliases`` (other names of the tensor in the model it was
    exported from, where the export kept one name: a tied LM head saved as the input embedding).
    Returns the checkpoint keys the model did not use; raises :class:`WeightsError` when a parameter
    or buffer stays unfilled or a shape does not match.
    """
    targets = model.state_dict(keep_vars=True)
    filled: set[int] = set()
    with ExitStack() as stack:
        index = _open_all(files, stack)
        for key in [k for k in targets if k in index]:
            _fill(targets[key], _read(index[key], key, shards.get(key)), key, filled)
        used = set(targets)
        for key, names in (aliases or {}).items():
            source = next((n for n in names if n in index), None)
            if key in targets and id(targets[key]) not in filled and source is not None:
                _fill(targets[key], _read(index[source], source, shards.get(key)), key, filled)
                used.add(source)
        others = {k: _read(handle, k, None) for k, handle in index.items() if k not in used}
    if others:
        _run_load_pre_hooks(model, others)
        for key in [k for k in others if k in targets]:
            shard = shards.get(key)
            _fill(targets[key], shard.cut(others[key]) if shard else others[key], key, filled)
    missing = [k for k, t in targets.items() if id(t) not in filled]
    if missing:
        raise WeightsError(", ".join(str(f) for f in files), f"no tensor for {missing[:5]}")
    return sorted(k for k in others if k not in targets)


def _fill(target: torch.Tensor, value: torch.Tensor, key: str, filled: set[int]) -> None:
    if target.shape != value.shape:
        raise WeightsError(
            key, f"checkpoint slice has shape {list(value.shape)}, expected {list(target.shape)}"
        )
    with torch.no_grad():
        target.copy_(value)
    filled.add(id(target))
