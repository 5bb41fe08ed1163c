"""Build a :class:`ServingEngine` from a model and ``onboardlm run``'s settings plus serving options."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from onboardlm.errors import OnboardlmError
from onboardlm.models.factory import AutoModelForCausalLMFactory, LoadReport
from onboardlm.registry.settings import RunSettings
from onboardlm.runtime.chat import stop_token_ids
from onboardlm.runtime.fp8 import check_quantize, checkpoint_fp8_specs, quantize_pass
from onboardlm.runtime.paged_cache import BlockAllocator, PagedKVCache, StateSlots, blocks_for
from onboardlm.runtime.paged_model import DECODE_BATCH_SIZES, PagedModel, build_paged_graph, default_speed
from onboardlm.runtime.runner import model_location, resolve_device, resolve_dtype
from onboardlm.runtime.scheduler import Scheduler, SchedulerLimits
from onboardlm.runtime.serving import EngineConfig, ServingEngine
from onboardlm.transforms.compile import SpeedOptions


@dataclass(frozen=True)
class ServeOptions:
    """Serving limits beyond the run settings (``max_batch_size`` = sequences running at once).

    ``kv_cache_tokens`` defaults to ``max_batch_size * max_seq_len``, the cache ``onboardlm run`` holds.
    ``fast_path`` forced on off CUDA runs the fast graph rewrites and pads decode steps as the CUDA graphs
    would (how the CPU tests check them).
    """

    block_size: int = 16
    kv_cache_tokens: int | None = None
    max_step_tokens: int = 256
    max_waiting: int = 256
    fast_path: bool | None = None  # None: on CUDA only (see onboardlm.runtime.paged_model)


def engine_for_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    stop_ids: Iterable[int],
    settings: RunSettings,
    options: ServeOptions,
) -> ServingEngine:
    """A (not yet started) engine over a loaded lean ``model``."""
    graph = build_paged_graph(model, quantize_pass(settings.quantize))
    device = next(model.parameters()).device
    cache_tokens = options.kv_cache_tokens or settings.max_batch_size * settings.max_seq_len
    num_blocks = max(
        blocks_for(cache_tokens, options.block_size), blocks_for(settings.max_seq_len, options.block_size)
    )
    fast = device.type == "cuda" if options.fast_path is None else options.fast_path
    speed = (default_speed(device) or SpeedOptions(batch_sizes=DECODE_BATCH_SIZES)) if fast else None
    spare = 1 if speed is not None else 0  # the fast path's padded decode rows write to a spare block
    # state layers: one state slot per running sequence (and the padded rows' spare slot)
    slots = settings.max_batch_size if graph.has_state else 0
    cache = PagedKVCache.allocate(
        graph.caches, num_blocks + spare, options.block_size, device, slots + spare if slots else 0
    )
    limits = SchedulerLimits(
        settings.max_batch_size, max(options.max_step_tokens, settings.max_batch_size), options.max_waiting
    )
    state_slots = StateSlots(slots) if slots else None
    scheduler = Scheduler(BlockAllocator(num_blocks, options.block_size), limits, state_slots)
    vocab = _vocab_size(model)
    config = EngineConfig(settings.max_seq_len, limits, vocab)
    paged = PagedModel(
        graph, cache, max_batch=settings.max_batch_size, max_seq_len=settings.max_seq_len, speed=speed,
        pad_decode=fast and device.type != "cuda",
    )  # fmt: skip
    return ServingEngine(paged, scheduler, tokenizer, stop_ids, config)


def _vocab_size(model: nn.Module) -> int:
    """Rows of the input embedding (a lean file whose embedding is not ``embed_tokens``, e.g. Mamba2's
    ``embeddings``, may not say which module it is: then the config's ``vocab_size``)."""
    try:
        return int(model.get_input_embeddings().weight.shape[0])
    except (NotImplementedError, AttributeError):
        return int(model.config.vocab_size)


@dataclass
class LoadedModel:
    """A lean model loaded as ``onboardlm run`` loads it, with what serving it needs."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    stop_ids: frozenset[int]
    config: PretrainedConfig
    report: LoadReport


def load_model(model: str | None, settings: RunSettings) -> LoadedModel:
    """Load ``model`` (``None``: the shipped default) on one device per ``settings``."""
    if settings.world_size > 1:
        raise OnboardlmError(
            f"world_size {settings.world_size}", "serve runs on one device", "serve with world_size 1"
        )
    check_quantize(settings.quantize, settings.world_size)
    device = resolve_device(settings.device)
    factory = AutoModelForCausalLMFactory(model_location(model), settings.model_kwargs)
    if checkpoint_fp8_specs(factory) is not None:
        raise OnboardlmError(
            factory.source.name,
            "serve does not load FP8 checkpoints yet",
            "use onboardlm run, or serve the float checkpoint with --quantize fp8",
        )
    tokenizer = factory.tokenizer()
    lean, report = factory.build_and_load(device=device, dtype=resolve_dtype(settings.dtype))
    stops = frozenset(stop_token_ids(tokenizer, factory.generation_config()))
    return LoadedModel(lean, tokenizer, stops, factory.config, report)


def load_engine(model: str | None, settings: RunSettings, options: ServeOptions) -> ServingEngine:
    """Load ``model`` (``None``: the shipped default) as ``onboardlm run`` does and build its engine."""
    loaded = load_model(model, settings)
    return engine_for_model(loaded.model, loaded.tokenizer, loaded.stop_ids, settings, options)
