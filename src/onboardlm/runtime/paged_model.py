"""A paged cached graph with its block cache: one model step over a packed batch of chunks."""

from __future__ import annotations

import torch
from torch import nn

from onboardlm.export import causal_lm_dynamic_shapes, torch_export_to_gm
from onboardlm.runtime.paged_cache import PagedKVCache, blocks_for
from onboardlm.runtime.scheduler import Chunk
from onboardlm.transforms import LOGIT_INDEX, CachedGraph, insert_logit_gather
from onboardlm.transforms.backends import use_direct_kernels
from onboardlm.transforms.fold_weights import fold_weight_computations
from onboardlm.transforms.paged_kv_cache import (
    BLOCK_TABLES,
    CACHED_LENS,
    QUERY_START,
    SLOT_MAPPING,
    insert_paged_attention,
    use_packed_logit_gather,
)


def build_paged_graph(model: nn.Module) -> CachedGraph:
    """Export ``model`` (dynamic batch and sequence), insert paged attention and the packed logit gather."""
    device = next(model.parameters()).device
    input_ids = torch.zeros(2, 8, dtype=torch.long, device=device)
    position_ids = torch.arange(8, device=device).expand(2, 8)
    gm = torch_export_to_gm(
        model,
        kwargs={"input_ids": input_ids, "position_ids": position_ids},
        dynamic_shapes=causal_lm_dynamic_shapes(),
    )
    paged = insert_paged_attention(gm)
    insert_logit_gather(paged.gm)
    use_packed_logit_gather(paged.gm)
    use_direct_kernels(paged.gm)
    fold_weight_computations(paged.gm)
    return paged


def pack_chunks(chunks: list[Chunk], block_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The graph inputs of one step: the chunks' tokens packed into one row, with the paged metadata."""
    ids: list[int] = []
    slots: list[int] = []
    starts = [0]
    cached = []
    width = max(blocks_for(c.start + c.length, block_size) for c in chunks)
    tables = []
    for chunk in chunks:
        seq = chunk.seq
        ids += seq.tokens[chunk.start : chunk.start + chunk.length]
        positions = range(chunk.start, chunk.start + chunk.length)
        slots += [seq.blocks[p // block_size] * block_size + p % block_size for p in positions]
        starts.append(starts[-1] + chunk.length)
        cached.append(chunk.start)
        table = seq.blocks[:width]
        tables.append(table + [0] * (width - len(table)))
    positions = torch.cat([torch.arange(c.start, c.start + c.length) for c in chunks])
    query_start = torch.tensor(starts)

    def as_tensor(x: torch.Tensor | list[int]) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.long).to(device)

    return {
        "input_ids": as_tensor(ids)[None],
        "position_ids": as_tensor(positions)[None],
        SLOT_MAPPING: as_tensor(slots),
        BLOCK_TABLES: as_tensor(tables),
        QUERY_START: as_tensor(query_start),
        CACHED_LENS: as_tensor(cached),
        LOGIT_INDEX: as_tensor(query_start[1:] - 1),
    }


class PagedModel:
    """A paged graph and its cache; :meth:`step` computes chunks and returns fp32 logits ``[S, vocab]``
    (the next-token logits after each chunk's last token)."""

    def __init__(self, graph: CachedGraph, cache: PagedKVCache) -> None:
        self.graph = graph
        self.cache = cache
        self.device = next(iter(cache.tensors.values())).device

    @torch.inference_mode()
    def step(self, chunks: list[Chunk]) -> torch.Tensor:
        inputs = pack_chunks(chunks, self.cache.block_size, self.device)
        logits = self.graph.gm(**inputs, **self.cache.tensors)
        return logits[0].float()
