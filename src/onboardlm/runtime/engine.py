"""Cached inference on an exported lean model: export + transforms, then prefill and decode steps."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.fx import GraphModule

from onboardlm.export import causal_lm_dynamic_shapes, torch_export_to_gm
from onboardlm.registry.settings import SamplingSettings
from onboardlm.runtime.cache import KVCache
from onboardlm.runtime.generate import Generation
from onboardlm.runtime.sampler import make_generator, sample
from onboardlm.runtime.timings import DecodeTimings, synchronized_clock
from onboardlm.transforms import (
    INPUT_POS,
    KV_LEN,
    LOGIT_INDEX,
    CachedGraph,
    insert_cached_attention,
    insert_logit_gather,
)
from onboardlm.transforms.backends import use_direct_kernels
from onboardlm.transforms.compile import SpeedOptions, accelerate
from onboardlm.transforms.fold_weights import fold_weight_computations
from onboardlm.transforms.state_cache import SEQ_LENS


def build_cached_graph(model: nn.Module, shard: Callable[[GraphModule], object] | None = None) -> CachedGraph:
    """Export ``model`` (dynamic batch and sequence) and insert cached attention (and cached state for
    SSM, conv and delta-rule layers) and the logit gather.

    ``shard`` (tensor parallelism) rewrites the exported graph for this rank before the cache is
    inserted, while the sharding hints are still in it.
    """
    device = next(model.parameters()).device
    input_ids = torch.zeros(2, 8, dtype=torch.long, device=device)
    position_ids = torch.arange(8, device=device).expand(2, 8)
    gm = torch_export_to_gm(
        model,
        kwargs={"input_ids": input_ids, "position_ids": position_ids},
        dynamic_shapes=causal_lm_dynamic_shapes(),
    )
    if shard is not None:
        shard(gm)
    cached = insert_cached_attention(gm)
    insert_logit_gather(cached.gm)
    use_direct_kernels(cached.gm)
    return cached


class CachedModel:
    """A cached graph with its KV cache: :meth:`prefill` a batch of prompts, then :meth:`decode` steps.

    Both return the fp32 logits ``[b, vocab]`` of each sequence's last token. Prompts of different
    lengths are right-padded; each sequence keeps its own length (``input_pos``), so padding is never
    attended to, and (for a graph with state) each row's real length (``seq_lens``), so padding never
    reaches its state. ``speed`` selects the fast path's parts (default: all on CUDA, none on the CPU).
    """

    def __init__(
        self, graph: CachedGraph, cache: KVCache, pad_id: int = 0, speed: SpeedOptions | None = None
    ) -> None:
        self.graph = graph
        self.cache = cache
        self.pad_id = pad_id
        self.device = next(iter(cache.tensors.values())).device
        # The fast path (fast attention, fused kernels, CUDA-graph decode steps: onboardlm.transforms.
        # compile) with ``speed``, by default on CUDA; else the reference ops, weight-only work done once.
        if speed is None and self.device.type == "cuda":
            speed = SpeedOptions()
        if speed is not None:
            self._step = accelerate(graph.gm, cache.tensors, speed, cache.max_seq)
        else:
            fold_weight_computations(graph.gm)
            self._step = graph.gm
        self._has_state = graph.has_state
        self.lengths = torch.zeros(0, dtype=torch.long)
        self._max_len = 0

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], max_new_tokens: int = 0) -> torch.Tensor:
        """Start new sequences from ``prompts`` (checked to fit with ``max_new_tokens`` more tokens)."""
        lengths = [len(p) for p in prompts]
        if not prompts or min(lengths) == 0:
            raise ValueError("prefill needs at least one prompt, each with at least one token")
        self.cache.check_fits(lengths, max_new_tokens)
        width = max(lengths)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=self.device)
        start = torch.zeros_like(self.lengths)
        positions = torch.arange(width, device=self.device).expand(len(prompts), width)
        logits = self._run(input_ids.to(self.device), positions, start, width, self.lengths - 1, self.lengths)
        self._max_len = width
        return logits

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token ``[b]`` to every sequence and return the next logits."""
        positions = self.lengths[:, None]
        ones = torch.ones_like(self.lengths)
        logits = self._run(tokens[:, None], positions, self.lengths, self._max_len + 1, ones - 1, ones)
        self.lengths = self.lengths + 1
        self._max_len += 1
        return logits

    def _run(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        input_pos: torch.Tensor,
        kv_len: int,
        logit_index: torch.Tensor,
        seq_lens: torch.Tensor,
    ) -> torch.Tensor:
        inputs = {INPUT_POS: input_pos, KV_LEN: kv_len, LOGIT_INDEX: logit_index}
        if self._has_state:
            inputs[SEQ_LENS] = seq_lens
        logits = self._step(input_ids=input_ids, position_ids=position_ids, **inputs, **self.cache.tensors)
        return logits[:, -1].float()

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        sampling: SamplingSettings | None = None,
        stop_ids: Iterable[int] = (),
        generator: torch.Generator | None = None,
        timings: DecodeTimings | None = None,
    ) -> list[Generation]:
        """Decode up to ``max_new_tokens`` per prompt; a sequence ends at its first stop token.

        Sampling draws from ``generator``, by default a fresh one seeded from ``sampling.seed``.
        ``timings`` gets this batch's time to the first token and the decode steps' time and rows.
        """
        sampling = sampling or SamplingSettings()
        generator = generator or make_generator(sampling, self.device)
        stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=self.device)
        started = synchronized_clock(self.device) if timings is not None else 0.0
        logits = self.prefill(prompts, max_new_tokens)
        steps: list[torch.Tensor] = []
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        first_token_at = started
        for step in range(max_new_tokens):
            token = sample(logits, sampling, generator)
            steps.append(token)
            finished |= torch.isin(token, stops)
            done = step == max_new_tokens - 1 or bool(finished.all())  # the step's one host sync
            if step == 0:
                first_token_at = time.perf_counter()
            if done:
                break
            logits = self.decode(token)
        if timings is not None:
            ended = time.perf_counter()
            timings.add_batch(
                first_token_at - started, ended - first_token_at, (len(steps) - 1) * len(prompts)
            )
        rows = torch.stack(steps, dim=1).tolist()
        return [_cut_at_stop(prompt, row, set(stop_ids)) for prompt, row in zip(prompts, rows, strict=True)]


def _cut_at_stop(prompt: list[int], tokens: list[int], stops: set[int]) -> Generation:
    for i, token in enumerate(tokens):
        if token in stops:
            return Generation(prompt, tokens[:i], stopped_on_eos=True)
    return Generation(prompt, tokens, stopped_on_eos=False)
