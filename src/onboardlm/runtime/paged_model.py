"""A paged cached graph with its block cache: one model step over a packed batch of chunks.

On the CPU the graph runs the reference ops. On CUDA (or when asked, see :class:`PagedModel`) it runs
the fast path: the Triton paged attention kernels (:mod:`onboardlm.transforms.fast_paged`), fused
shared-input linears, compiled elementwise kernels and weight-only work done once, as ``onboardlm
run``'s graph does; and every decode step (one token per sequence) of ``b`` sequences is padded to the
smallest decode batch size ``B >= b`` and replayed from a CUDA graph captured for ``B`` with block
tables as wide as the longest sequence. Padded rows compute token 0 at position 0 of the cache's spare
block (the last block of the cache, which the allocator never hands out), so they never touch a live
sequence's cache; in a model with state layers they also start from a zero state in the spare state slot
(the last slot, never handed out either). A step's inputs go to the device as one host tensor in one copy; the only host
synchronisation of a step is reading its sampled tokens (by the caller).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from onboardlm.export import causal_lm_dynamic_shapes, torch_export_to_gm
from onboardlm.runtime.paged_cache import PagedKVCache, blocks_for
from onboardlm.runtime.scheduler import Chunk
from onboardlm.transforms import LOGIT_INDEX, CachedGraph, insert_logit_gather
from onboardlm.transforms.backends import use_direct_kernels
from onboardlm.transforms.compile import SpeedOptions, uncapturable_reason
from onboardlm.transforms.fast_paged import use_fast_paged_attention
from onboardlm.transforms.fold_weights import fold_weight_computations
from onboardlm.transforms.fuse_fp8 import fuse_fp8_linears
from onboardlm.transforms.fuse_linears import fuse_shared_input_linears
from onboardlm.transforms.fusion import fuse_elementwise
from onboardlm.transforms.moe_backend import use_grouped_moe
from onboardlm.transforms.paged_kv_cache import (
    BLOCK_TABLES,
    CACHED_LENS,
    QUERY_START,
    SLOT_MAPPING,
    insert_paged_attention,
    use_packed_logit_gather,
)
from onboardlm.transforms.state_cache import STATE_SLOTS

logger = logging.getLogger(__name__)

#: Decode batch sizes captured as CUDA graphs (those up to the engine's running limit, and the limit).
DECODE_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def build_paged_graph(
    model: nn.Module, rewrite: Callable[[GraphModule], object] | None = None
) -> CachedGraph:
    """Export ``model`` (dynamic batch and sequence), insert paged attention and the packed logit gather.

    ``rewrite`` (e.g. FP8 quantisation) changes the exported graph in place before the cache goes in.
    """
    device = next(model.parameters()).device
    input_ids = torch.zeros(2, 8, dtype=torch.long, device=device)
    position_ids = torch.arange(8, device=device).expand(2, 8)
    gm = torch_export_to_gm(
        model,
        kwargs={"input_ids": input_ids, "position_ids": position_ids},
        dynamic_shapes=causal_lm_dynamic_shapes(),
    )
    if rewrite is not None:
        rewrite(gm)
    paged = insert_paged_attention(gm)
    insert_logit_gather(paged.gm)
    use_packed_logit_gather(paged.gm)
    use_direct_kernels(paged.gm)
    return paged


def default_speed(device: torch.device) -> SpeedOptions | None:
    """The fast path's options on CUDA (CUDA graphs for :data:`DECODE_BATCH_SIZES`); None elsewhere."""
    return SpeedOptions(batch_sizes=DECODE_BATCH_SIZES) if device.type == "cuda" else None


def accelerate_paged(gm: GraphModule, options: SpeedOptions, device: torch.device) -> GraphModule:
    """The fast path's graph rewrites (in place; returns ``gm``): the Triton paged attention kernels
    where they run, grouped MoE, fused shared-input linears, weight-only work folded, fused elementwise
    kernels (compiled on CUDA)."""
    if options.decode_kernel:
        use_fast_paged_attention(gm)
    use_grouped_moe(gm)
    fuse_fp8_linears(gm, fuse_shared_input=options.fuse_linears)
    if options.fuse_linears:
        fuse_shared_input_linears(gm)
    fold_weight_computations(gm)
    if options.fuse:
        fuse_elementwise(gm, compile=device.type == "cuda")
    return gm


def _host_inputs(
    chunks: list[Chunk],
    block_size: int,
    width: int,
    rows: int | None = None,
    spare: int = 0,
    spare_slot: int = 0,
) -> torch.Tensor:
    """The step's inputs as one int64 host tensor (see :func:`_split_inputs` for the layout).

    ``rows`` (decode steps only): pad the step to that many one-token rows on block ``spare`` and
    state slot ``spare_slot``.
    """
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    cached: list[int] = []
    starts = [0]
    tables: list[int] = []
    state_slots: list[int] = []
    for chunk in chunks:
        seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.length
        blocks = seq.blocks
        ids += seq.tokens[start:end]
        positions += range(start, end)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(start, end)]
        cached.append(start)
        state_slots.append(max(seq.state_slot, 0))
        starts.append(starts[-1] + chunk.length)
        table = blocks[:width]
        tables += table
        if len(table) < width:
            tables += [0] * (width - len(table))
    pad = 0 if rows is None else rows - len(chunks)
    if pad:
        ids += [0] * pad
        positions += [0] * pad
        slots += [spare * block_size] * pad
        cached += [0] * pad
        starts += range(starts[-1] + 1, starts[-1] + 1 + pad)
        tables += [spare] * (pad * width)
        state_slots += [spare_slot] * pad
    logit_index = [s - 1 for s in starts[1:]]
    flat = ids + positions + slots + logit_index + cached + starts + tables + state_slots
    return torch.tensor(flat, dtype=torch.long)


def _split_inputs(flat: torch.Tensor, tokens: int, seqs: int, width: int) -> dict[str, torch.Tensor]:
    """The graph's inputs as views of ``flat``: ``input_ids``, ``position_ids``, ``slot_mapping`` (``T``
    each), ``logit_index``, ``cached_lens`` (``S``), ``query_start`` (``S + 1``), ``block_tables``
    (``S x width``), ``state_slots`` (``S``; only a graph with state layers reads it)."""
    sizes = (tokens, tokens, tokens, seqs, seqs, seqs + 1, seqs * width, seqs)
    ids, positions, slots, logit_index, cached, starts, tables, state_slots = flat.split(sizes)
    return {
        "input_ids": ids.view(1, tokens),
        "position_ids": positions.view(1, tokens),
        SLOT_MAPPING: slots,
        BLOCK_TABLES: tables.view(seqs, width),
        QUERY_START: starts,
        CACHED_LENS: cached,
        LOGIT_INDEX: logit_index,
        STATE_SLOTS: state_slots,
    }


def pack_chunks(chunks: list[Chunk], block_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The graph inputs of one step: the chunks' tokens packed into one row, with the paged metadata
    (block tables as wide as the step's longest sequence so far)."""
    width = max(blocks_for(c.start + c.length, block_size) for c in chunks)
    flat = _host_inputs(chunks, block_size, width).to(device)
    return _split_inputs(flat, sum(c.length for c in chunks), len(chunks), width)


@dataclass
class _DecodeBucket:
    """The static inputs of decode steps padded to ``size`` rows, and their CUDA graph once captured."""

    size: int
    flat: torch.Tensor
    inputs: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


class PagedModel:
    """A paged graph and its cache; :meth:`step` computes chunks and returns fp32 logits ``[S, vocab]``
    (the next-token logits after each chunk's last token).

    ``speed`` turns the fast path on (:func:`default_speed` gives the device's default; None: the
    reference ops). With it, the cache's last block is the padded rows' spare block: the allocator must
    hand out one block fewer than the cache holds. ``max_batch`` and ``max_seq_len`` bound the decode steps to capture.
    ``pad_decode`` pads decode steps to the batch sizes even where no CUDA graph is captured (the CPU
    tests check the padding that way).
    """

    def __init__(
        self,
        graph: CachedGraph,
        cache: PagedKVCache,
        *,
        max_batch: int = 0,
        max_seq_len: int = 0,
        speed: SpeedOptions | None = None,
        pad_decode: bool = False,
    ) -> None:
        self.graph = graph
        self.cache = cache
        self.device = next(iter(cache.tensors.values())).device
        self.speed = speed
        self.spare_block = cache.num_blocks - 1 if speed is not None else None
        self.spare_slot = max(cache.num_state_slots - 1, 0)
        self._inputs = {n.name for n in graph.gm.graph.nodes if n.op == "placeholder"}
        if speed is not None:
            accelerate_paged(graph.gm, speed, self.device)
        else:
            fold_weight_computations(graph.gm)
        self.width = blocks_for(max_seq_len, cache.block_size) if max_seq_len else 0
        self._buckets: dict[int, _DecodeBucket] = {}
        self.skipped: dict[int, str] = {}  # decode batch sizes that could not be captured, and why
        self._pool: Any = None
        if speed is not None and max_batch and self.width:
            sizes = sorted({s for s in speed.batch_sizes if s <= max_batch} | {max_batch})
            use_graphs = speed.cuda_graphs and self.device.type == "cuda"
            if use_graphs and uncapturable_reason(graph.gm) is not None:
                use_graphs = False
            if use_graphs or pad_decode:
                for size in sizes:
                    try:
                        self._buckets[size] = self._bucket(size, capture=use_graphs)
                    except RuntimeError as error:  # recorded; steps of this size then run eagerly
                        self.skipped[size] = str(error).splitlines()[0]
                        logger.warning("decode batch size %d not captured: %s", size, self.skipped[size])

    @property
    def captured(self) -> list[int]:
        """Decode batch sizes replayed from CUDA graphs."""
        return sorted(size for size, bucket in self._buckets.items() if bucket.graph is not None)

    def _bucket(self, size: int, capture: bool) -> _DecodeBucket:
        assert self.spare_block is not None
        flat = _host_inputs([], self.cache.block_size, self.width, size, self.spare_block, self.spare_slot)
        flat = flat.to(self.device)
        bucket = _DecodeBucket(size, flat, self._graph_inputs(_split_inputs(flat, size, size, self.width)))
        if not capture:
            return bucket
        gm, caches = self.graph.gm, self.cache.tensors
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # compile and warm up outside the capture
                gm(**bucket.inputs, **caches)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            bucket.logits = gm(**bucket.inputs, **caches)
        self._pool = graph.pool()
        bucket.graph = graph
        return bucket

    def _graph_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: value for name, value in inputs.items() if name in self._inputs}

    def _decode_bucket(self, chunks: list[Chunk]) -> _DecodeBucket | None:
        if not self._buckets or any(c.length != 1 for c in chunks):
            return None
        if max(c.start for c in chunks) >= self.width * self.cache.block_size:
            return None
        return min(
            (b for s, b in self._buckets.items() if s >= len(chunks)), key=lambda b: b.size, default=None
        )

    @torch.inference_mode()
    def step(self, chunks: list[Chunk]) -> torch.Tensor:
        bucket = self._decode_bucket(chunks)
        if bucket is None:
            inputs = self._graph_inputs(pack_chunks(chunks, self.cache.block_size, self.device))
            logits = self.graph.gm(**inputs, **self.cache.tensors)
            return logits[0].float()
        host = _host_inputs(
            chunks, self.cache.block_size, self.width, bucket.size, self.spare_block, self.spare_slot
        )
        bucket.flat.copy_(host)
        if bucket.graph is None:
            logits = self.graph.gm(**bucket.inputs, **self.cache.tensors)
        else:
            bucket.graph.replay()
            logits = bucket.logits
        return logits[0, : len(chunks)].float()
