"""End-to-end runs: load a model per the run settings, build the cached graph, answer prompts.

``run_prompts(model, prompts, settings)`` is the library entry point of ``onboardlm run`` and of the
onboarding E2E phase; :class:`Runner` keeps the loaded graph for several calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.fx import GraphModule
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from onboardlm.errors import OnboardlmError, WeightsError
from onboardlm.models.factory import AutoModelForCausalLMFactory, LoadReport
from onboardlm.models.source import default_model_path
from onboardlm.registry.settings import RunSettings
from onboardlm.runtime.cache import KVCache, check_fits
from onboardlm.runtime.chat import encode_chat_prompt, stop_token_ids
from onboardlm.runtime.engine import CachedModel, build_cached_graph
from onboardlm.runtime.fp8 import check_quantize, checkpoint_fp8_specs, fp8_checkpoint_graph, quantize_pass
from onboardlm.runtime.prompts import check_prompts, default_prompts
from onboardlm.runtime.sampler import make_generator
from onboardlm.runtime.tensor_parallel import graph_sharder, rank_for_run, rank_local_sharder, tied_names
from onboardlm.runtime.timings import DecodeTimings, RunTimings, synchronized_clock
from onboardlm.transforms import CachedGraph
from onboardlm.transforms.sharding import ShardingReport

logger = logging.getLogger(__name__)

#: The model the shipped GGUF file holds; its registry entry applies to the default run.
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class PromptResult:
    """One prompt and the model's answer."""

    index: int
    prompt: str
    output: str
    prompt_tokens: int
    new_token_ids: list[int] = field(default_factory=list)
    stopped_on_eos: bool = False

    def log_line(self) -> str:
        """The line the seed's runner logs: ``[PROMPT i] <prompt>: <output>``."""
        return f"[PROMPT {self.index}] {self.prompt}: {self.output}"


def model_location(model: str | None) -> str:
    """Where to load ``model`` from: the shipped GGUF for the default model (by id or when None)."""
    if model is None or model == DEFAULT_MODEL_ID:
        return str(default_model_path())
    return model


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OnboardlmError(f"device {device!r}", "no CUDA GPU is available here", "use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise OnboardlmError(f"device {device!r}", "not a device torch knows", "use cpu or cuda") from None


def resolve_dtype(dtype: str) -> torch.dtype | None:
    """``auto`` -> None (the checkpoint's dtype), else the torch dtype of that name."""
    return None if dtype == "auto" else getattr(torch, dtype)


@dataclass
class Runner:
    """A loaded model as a cached graph, with its tokenizer and run settings."""

    model_name: str
    settings: RunSettings
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    graph: CachedGraph
    report: LoadReport
    device: torch.device
    stop_ids: frozenset[int]
    timings: RunTimings = field(default_factory=lambda: RunTimings(load_s=0.0, export_s=0.0))

    @classmethod
    def load(cls, model: str | None, settings: RunSettings) -> Runner:
        """Build ``model`` (``None``: the shipped default) with ``settings`` and export its cached graph."""
        device = resolve_device(settings.device)
        shard = None
        if settings.world_size > 1:
            info, device = rank_for_run(settings.world_size, device)
            shard = graph_sharder(info, device)
            if settings.sampling.seed is None:  # every rank must draw the same tokens
                settings = settings.model_copy(
                    update={"sampling": settings.sampling.model_copy(update={"seed": 0})}
                )
        location = model_location(model)
        started = time.perf_counter()
        export_s = 0.0
        factory = AutoModelForCausalLMFactory(location, settings.model_kwargs)
        tokenizer = factory.tokenizer()
        dtype = resolve_dtype(settings.dtype)
        weights = factory.source.weights
        graph: CachedGraph | None = None
        specs = checkpoint_fp8_specs(factory)
        check_quantize("fp8" if specs is not None else settings.quantize, settings.world_size)
        if specs is not None:
            graph, report = fp8_checkpoint_graph(factory, specs, device, dtype)
        elif shard is not None and weights is not None and weights.format == "safetensors":
            try:
                graph, report = _rank_local_graph(factory, shard, device, dtype)
            except WeightsError as error:  # e.g. an older hub layout: transformers converts it whole
                logger.warning("reading this rank's shards failed (%s); loading the whole checkpoint", error)
        if graph is None:
            lean, report = factory.build_and_load(device=device, dtype=dtype)
            exporting = synchronized_clock(device)
            graph = build_cached_graph(lean, shard or quantize_pass(settings.quantize))
            export_s = synchronized_clock(device) - exporting
            if settings.quantize != "none":
                report.notes.append(
                    f"linears quantised to {settings.quantize} (weights per channel, activations per token)"
                )
        stops = frozenset(stop_token_ids(tokenizer, factory.generation_config()))
        # the rank-local path reads each shard into the exported graph: its time counts as loading
        timings = RunTimings(load_s=time.perf_counter() - started - export_s, export_s=export_s)
        return cls(
            model or DEFAULT_MODEL_ID,
            settings,
            factory.config,
            tokenizer,
            graph,
            report,
            device,
            stops,
            timings,
        )

    def run(self, prompts: list[str] | None = None) -> list[PromptResult]:
        """Answer ``prompts`` (default: the settings' prompts, else the ten default prompts) in batches."""
        texts = prompts or self.settings.prompts or default_prompts()
        check_prompts(texts)
        encoded = [encode_chat_prompt(self.tokenizer, text) for text in texts]
        settings = self.settings
        lengths = [len(ids) for ids in encoded]  # refuse before any compute; batches are cut below
        check_fits(lengths, settings.max_new_tokens, len(lengths), settings.max_seq_len)
        generator = make_generator(settings.sampling, self.device)  # one random stream for all batches
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # One cache (and, on CUDA, one set of captured decode graphs) for every batch of the run.
        cache = KVCache.allocate(
            self.graph.caches,
            min(settings.max_batch_size, len(encoded)),
            max(lengths) + settings.max_new_tokens,
            self.device,
        )
        warming = synchronized_clock(self.device)
        model = CachedModel(self.graph, cache, pad_id)
        batches = [
            encoded[start : start + settings.max_batch_size]
            for start in range(0, len(encoded), settings.max_batch_size)
        ]
        if self.device.type == "cuda":  # compile and capture what the run uses: each batch's size and width
            for batch in _first_of_each_shape(batches):  # a prefill and a decode step (one token: no decode)
                model.generate(batch, max_new_tokens=min(2, settings.max_new_tokens))
        self.timings.warm_up_s = synchronized_clock(self.device) - warming
        self.timings.decode = DecodeTimings()
        results: list[PromptResult] = []
        for number, batch in enumerate(batches):
            start = number * settings.max_batch_size
            generations = model.generate(
                batch,
                max_new_tokens=settings.max_new_tokens,
                sampling=settings.sampling,
                stop_ids=self.stop_ids,
                generator=generator,
                timings=self.timings.decode,
            )
            for offset, generation in enumerate(generations):
                index = start + offset
                output = self.tokenizer.decode(generation.new_ids, skip_special_tokens=True).strip()
                results.append(
                    PromptResult(
                        index,
                        texts[index],
                        output,
                        len(generation.prompt_ids),
                        generation.new_ids,
                        generation.stopped_on_eos,
                    )
                )
        return results


def _first_of_each_shape(batches: list[list[list[int]]]) -> list[list[list[int]]]:
    """The first batch of each (size, longest prompt) shape: warming each up captures the decode
    graphs of its batch size and the prefill graph of its padded width before the timed run."""
    shapes: dict[tuple[int, int], list[list[int]]] = {}
    for batch in batches:
        shapes.setdefault((len(batch), max(map(len, batch))), batch)
    return list(shapes.values())


def _rank_local_graph(
    factory: AutoModelForCausalLMFactory,
    shard: Callable[[GraphModule], ShardingReport],
    device: torch.device,
    dtype: torch.dtype | None,
) -> tuple[CachedGraph, LoadReport]:
    """A tensor-parallel rank's graph: exported from a meta-device model, sharded, then filled with only
    this rank's slices of the safetensors checkpoint (no rank holds the whole model)."""
    weights = factory.source.weights
    assert weights is not None
    lean, buffers = factory.build_empty(dtype)
    sharder = rank_local_sharder(shard, device, buffers, weights.files, tied_names(lean))
    graph = build_cached_graph(lean, sharder)
    cls_name, is_custom = type(lean).__name__, factory.model_class()[1]
    source = ", ".join(str(f) for f in weights.files)
    return graph, LoadReport(cls_name, is_custom, source, notes=["this rank read only its shards"])


def run_prompts(
    model: str | Path | None, prompts: list[str] | None, settings: RunSettings
) -> list[PromptResult]:
    """Load ``model`` per ``settings`` and answer ``prompts`` (None: the settings' or the ten defaults)."""
    return Runner.load(None if model is None else str(model), settings).run(prompts)
