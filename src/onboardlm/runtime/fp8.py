"""FP8 on the user's path: FP8 checkpoints loaded straight into the graph, ``--quantize fp8`` for float ones.

An FP8 checkpoint (:mod:`onboardlm.models.fp8_checkpoint`) never becomes a float model: the lean
model is built on the meta device and exported, its linears become FP8 fake-quant linears with
empty FP8 weights and scales under the checkpoint's names
(:func:`onboardlm.transforms.quantize_fp8.quantize_fp8_linears`), then every tensor gets memory on
the device and the safetensors files are read into the graph by key, as a tensor-parallel rank
reads its slices. A float checkpoint under ``quantize: fp8`` loads as usual and its exported graph
is quantised per channel before the KV cache goes in. On CUDA the fast path then swaps the fused
kernels in (:mod:`onboardlm.transforms.fuse_fp8`); elsewhere the reference op runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx import GraphModule

from onboardlm.errors import OnboardlmError, WeightsError
from onboardlm.models.factory import AutoModelForCausalLMFactory, LoadReport
from onboardlm.models.fp8_checkpoint import fp8_specs
from onboardlm.runtime.distributed import load_rank_weights
from onboardlm.runtime.engine import build_cached_graph
from onboardlm.runtime.tensor_parallel import _materialize, _retarget_device
from onboardlm.transforms import CachedGraph
from onboardlm.transforms.quantize_fp8 import Fp8LinearSpec, quantize_fp8_linears

QUANTIZE_CHOICES = ("none", "fp8")


def check_quantize(quantize: str, world_size: int) -> None:
    """Refuse what FP8 does not support yet: tensor parallelism."""
    if quantize not in QUANTIZE_CHOICES:
        raise OnboardlmError(f"quantize {quantize!r}", f"is not one of {', '.join(QUANTIZE_CHOICES)}")
    if quantize != "none" and world_size > 1:
        raise OnboardlmError(
            f"quantize {quantize!r} with world_size {world_size}",
            "FP8 linears are not sharded yet",
            "run FP8 with world_size 1",
        )


def quantize_pass(quantize: str) -> Callable[[GraphModule], object] | None:
    """The graph rewrite that ``quantize`` asks for on a float checkpoint, or None."""
    return quantize_fp8_linears if quantize == "fp8" else None


def checkpoint_fp8_specs(factory: AutoModelForCausalLMFactory) -> dict[str, Fp8LinearSpec] | None:
    """The FP8 layout of ``factory``'s checkpoint, or None when it is not an FP8 checkpoint."""
    return fp8_specs(factory.config, factory.source.weights)


def default_fp8_dtype(factory: AutoModelForCausalLMFactory) -> torch.dtype:
    """The compute dtype of an FP8 checkpoint under ``dtype: auto``: its config's float dtype, else bf16."""
    dtype = getattr(factory.config, "dtype", None) or getattr(factory.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16


def fp8_checkpoint_graph(
    factory: AutoModelForCausalLMFactory,
    specs: dict[str, Fp8LinearSpec],
    device: torch.device,
    dtype: torch.dtype | None,
) -> tuple[CachedGraph, LoadReport]:
    """The cached graph of an FP8 checkpoint, filled from its safetensors files (module doc)."""
    weights = factory.source.weights
    assert weights is not None
    lean, buffers = factory.build_empty(dtype or default_fp8_dtype(factory))
    source = ", ".join(str(f) for f in weights.files)

    def quantize_and_load(gm: GraphModule) -> None:
        quantize_fp8_linears(gm, specs)
        _materialize(gm, device, buffers, {})
        _retarget_device(gm, device)
        unused = load_rank_weights(gm, weights.files, {})
        if unused:
            raise WeightsError(source, f"checkpoint tensors the model does not read: {unused[:5]}")

    graph = build_cached_graph(lean, quantize_and_load)
    note = f"{len(specs)} linears in FP8 from the checkpoint"
    report = LoadReport(type(lean).__name__, factory.model_class()[1], source, len(specs), notes=[note])
    return graph, report
