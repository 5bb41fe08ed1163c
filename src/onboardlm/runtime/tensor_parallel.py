"""Tensor-parallel runs: one process per rank (launched by ``torchrun``), the graph sharded by its hints.

    torchrun --nproc-per-node N -m onboardlm.cli run --model MODEL --world-size N

Every rank builds and exports the model, checks the sharding plan (bad sizes fail here, before any
process group exists), joins the group (NCCL on CUDA, gloo on CPU) and shards its graph; rank 0
prints. The collectives are torch.distributed's own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.fx import GraphModule

from onboardlm.errors import OnboardlmError
from onboardlm.runtime.distributed import RankInfo, rank_device
from onboardlm.transforms.sharding import ShardingReport, apply_sharding_hints, plan_sharding

LAUNCH_HINT = "launch it as: torchrun --nproc-per-node {n} -m onboardlm.cli run ... --world-size {n}"


def rank_for_run(world_size: int, device: torch.device) -> tuple[RankInfo, torch.device]:
    """This process's rank for a run of ``world_size`` ranks, and the device it computes on."""
    info = RankInfo.from_env()
    if info.world_size != world_size:
        raise OnboardlmError(
            f"--world-size {world_size}",
            f"this process was started as rank {info.rank} of {info.world_size}",
            LAUNCH_HINT.format(n=world_size),
        )
    return info, rank_device(info, device.type)


def graph_sharder(info: RankInfo, device: torch.device) -> Callable[[GraphModule], ShardingReport]:
    """The ``shard`` step of :func:`onboardlm.runtime.engine.build_cached_graph` for this rank."""

    def shard(gm: GraphModule) -> ShardingReport:
        plan_sharding(gm, info.rank, info.world_size)  # refuses before the group is created
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size)
        return apply_sharding_hints(gm, info.rank, info.world_size)

    return shard


def close_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
