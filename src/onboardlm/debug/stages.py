"""The runtime's graph transforms as stages that can be turned on one at a time.

:data:`STAGES` lists them in the order :func:`onboardlm.debug.transform_bisect.bisect_transforms` turns
them on; :func:`cached_logits` builds the cached graph of an exported model with a set of them on, applied
in the runtime's own order (:func:`onboardlm.runtime.engine.build_cached_graph`, then
:func:`onboardlm.transforms.compile.accelerate`), and returns its logits for a prefill then decode steps.
The sharding stage runs in worker processes (:mod:`onboardlm.debug.shard_worker`); here it is the
``shard`` callable applied before the cache is inserted.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from onboardlm.testing.cached import prefill_then_decode, zero_caches
from onboardlm.transforms import insert_cached_attention, insert_logit_gather
from onboardlm.transforms.backends import use_direct_kernels
from onboardlm.transforms.fast_attention import use_fast_attention
from onboardlm.transforms.fast_mla import use_fast_mla
from onboardlm.transforms.fold_weights import fold_weight_computations
from onboardlm.transforms.fuse_linears import fuse_shared_input_linears
from onboardlm.transforms.fusion import fuse_elementwise
from onboardlm.transforms.moe_backend import use_grouped_moe


def _kernels(gm: GraphModule) -> None:
    use_fast_attention(gm)
    use_fast_mla(gm)
    use_grouped_moe(gm)


def _fusion(gm: GraphModule) -> None:
    device = next((t.device for t in gm.parameters()), torch.device("cpu"))
    fuse_elementwise(gm, compile=device.type == "cuda")


@dataclass(frozen=True)
class Stage:
    """One transform (or group of transforms) of the runtime: ``apply`` rewrites a cached graph in
    place; ``order`` is its place in the runtime's pipeline (lower runs first)."""

    name: str
    description: str
    apply: Callable[[GraphModule], object]
    order: int


#: The graph transforms after the KV cache, in the order they are turned on. ``kv_cache`` (cached
#: attention, logit gather, direct kernels) is always on in a cached graph; ``sharding`` is separate.
STAGES: tuple[Stage, ...] = (
    Stage("fold_weights", "weight-only work done once", fold_weight_computations, 2),
    Stage("fused_linears", "q/k/v and gate/up GEMMs fused", fuse_shared_input_linears, 1),
    Stage("fusion", "add+RMSNorm, SiLU-mul fused", _fusion, 3),
    Stage("kernels", "SDPA/decode attention, MLA, grouped MoE", _kernels, 0),
)  # fmt: skip

STAGE_NAMES = ("export", "kv_cache", *(stage.name for stage in STAGES), "sharding")


def stage_by_name(names: Sequence[str], stages: Sequence[Stage] = STAGES) -> list[Stage]:
    by_name = {stage.name: stage for stage in stages}
    return [by_name[name] for name in names if name in by_name]


def cached_logits(
    exported: GraphModule,
    enabled: Sequence[Stage],
    input_ids: torch.Tensor,
    prompt_len: int,
    shard: Callable[[GraphModule], object] | None = None,
) -> torch.Tensor:
    """Logits ``[positions, b, vocab]`` (positions ``prompt_len - 1 ..``) of a copy of ``exported`` with
    the KV cache and the ``enabled`` stages, for a prefill of ``prompt_len`` tokens then decode steps."""
    with warnings.catch_warnings():  # torch's pytree deprecation note, raised by copying the graph
        warnings.simplefilter("ignore", FutureWarning)
        gm = copy.deepcopy(exported)
    if shard is not None:
        shard(gm)
    cached = insert_cached_attention(gm)
    insert_logit_gather(cached.gm)
    use_direct_kernels(cached.gm)
    for stage in sorted(enabled, key=lambda stage: stage.order):
        stage.apply(cached.gm)
    device = input_ids.device
    caches = {
        name: t.to(device) for name, t in zero_caches(cached, input_ids.shape[0], input_ids.shape[1]).items()
    }
    return prefill_then_decode(cached.gm, caches, input_ids, prompt_len).float()
