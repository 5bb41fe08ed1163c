"""Tensor-parallel runs: one process per rank (launched by ``torchrun``), the graph sharded by its hints.

    torchrun --nproc-per-node N -m onboardlm.cli run --model MODEL --world-size N

Every rank exports the model, checks the sharding plan (bad sizes fail here, before any process group
exists), joins the group (NCCL on CUDA, gloo on CPU) and shards its graph; rank 0 prints. The
collectives are torch.distributed's own. With a safetensors checkpoint the model is exported from the
meta device and each rank reads only its slices (:func:`rank_local_sharder`); other checkpoints
(and layouts that transformers must convert) are loaded whole, then sharded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.fx import GraphModule

from onboardlm.errors import OnboardlmError
from onboardlm.runtime.distributed import RankInfo, load_rank_weights, rank_device
from onboardlm.transforms.sharding import (
    ParamShard,
    ShardingReport,
    apply_sharding_hints,
    check_devices,
    plan_sharding,
)

LAUNCH_HINT = "launch it as: torchrun --nproc-per-node {n} -m onboardlm.cli run ... --world-size {n}"


def rank_for_run(world_size: int, device: torch.device) -> tuple[RankInfo, torch.device]:
    """This process's rank for a run of ``world_size`` ranks, and the device it computes on."""
    check_devices(world_size, device)  # more ranks than GPUs: say so before how to launch them
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


def tied_names(model: nn.Module) -> dict[str, list[str]]:
    """Each name of a parameter that has several (tied embeddings) -> its other names."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {
        name: [o for o in names if o != name] for names in groups.values() if len(names) > 1 for name in names
    }


def rank_local_sharder(
    shard: Callable[[GraphModule], ShardingReport],
    device: torch.device,
    buffers: Mapping[str, torch.Tensor],
    files: Sequence[Path],
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> Callable[[GraphModule], ShardingReport]:
    """``shard`` for a graph exported from a meta-device model, then fill this rank's part only.

    After sharding, every meta tensor of the graph gets memory on ``device`` (tensors that alias each
    other, such as tied embeddings, stay one tensor), the buffers get their computed values (cut
    like a sharded parameter where the plan shards them), the device arguments the export recorded
    point at ``device``, and :func:`load_rank_weights` reads this rank's slices of the safetensors
    ``files`` (a tied parameter under any of its ``aliases``, see :func:`tied_names`).
    """

    def shard_and_load(gm: GraphModule) -> ShardingReport:
        report = shard(gm)
        _materialize(gm, device, buffers, report.params)
        _retarget_device(gm, device)
        load_rank_weights(gm, files, report.params, aliases)
        return report

    return shard_and_load


def _materialize(
    gm: GraphModule,
    device: torch.device,
    buffers: Mapping[str, torch.Tensor],
    shards: Mapping[str, ParamShard],
) -> None:
    made: dict[int, torch.Tensor] = {}
    for store_name in ("_parameters", "_buffers"):
        for module_name, module in gm.named_modules(remove_duplicate=False):
            store = getattr(module, store_name)
            for name, tensor in list(store.items()):
                if tensor is None or not tensor.is_meta:
                    continue
                if id(tensor) not in made:
                    full = f"{module_name}.{name}" if module_name else name
                    value = buffers.get(full)
                    if value is not None:
                        value = shards[full].cut(value) if full in shards else value
                        value = value.to(device=device, dtype=tensor.dtype)
                    else:
                        value = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
                    is_param = isinstance(tensor, nn.Parameter)
                    made[id(tensor)] = nn.Parameter(value, requires_grad=False) if is_param else value
                store[name] = made[id(tensor)]


def _retarget_device(gm: GraphModule, device: torch.device) -> None:
    """Point the device arguments the export recorded (``meta``: where the model was traced) at ``device``."""

    def swap(value: object) -> object:
        return device if isinstance(value, torch.device) and value.type == "meta" else value

    for node in gm.graph.nodes:
        node.args = torch.fx.node.map_aggregate(node.args, swap)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, swap)
    gm.recompile()


def close_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
