"""Paged cached attention: the KV cache as fixed-size blocks, read through per-sequence block tables.

The batch of a step is *packed*: the new tokens of every sequence sit one after another in a single row
``[1, T, ...]``; sequence ``i`` owns tokens ``query_start[i] .. query_start[i + 1] - 1`` (``query_start``
``[S + 1]``, starting at 0, increasing), at absolute positions ``cached_lens[i] + 0, 1, ...``
(``cached_lens[i]`` tokens of that sequence are already in the cache). A step may mix one-token decodes
with prompt chunks of any length.

Caches are ``[num_blocks, block_size, n_kv, d]``. New token ``t`` is written to slot ``slot_mapping[t]``
(``block * block_size + offset``); sequence ``i`` reads its keys through ``block_tables[i]`` ``[S, M]``
(block ids in order; entries past the sequence's last block may hold any block id: they are masked).
Masking, the sliding window, the logit cap and sinks follow ``onboardlm_cached_attention`` with absolute
positions: key ``j`` is allowed for the query at position ``p`` iff ``j < cached_lens[i] + new[i]``,
``j <= p`` (causal) and ``p - j < sliding_window`` (when set).
"""

from __future__ import annotations

import math

import torch

from onboardlm.ops.attention import attend_bnsd, check_layout, to_bnsd
from onboardlm.transforms.cached_ops import chunk_allowed

NAMESPACE = "auto_deploy"
PAGED_ATTENTION = "onboardlm_paged_attention"


def write_slots(cache: torch.Tensor, new: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store ``new`` ``[T, *features]`` into the flat slots ``slot_mapping`` ``[T]`` of ``cache``."""
    cache.view(-1, *cache.shape[2:])[slot_mapping] = new.to(cache.dtype)


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """``[S, M * block_size, *features]``: each sequence's cache positions in order, through its blocks."""
    blocks = cache[block_tables]
    return blocks.reshape(block_tables.shape[0], -1, *cache.shape[2:])


def paged_mask(
    query_pos: torch.Tensor,
    kv_lens: torch.Tensor,
    num_keys: int,
    is_causal: bool,
    sliding_window: int | None,
    attention_chunk_size: int | None = None,
) -> torch.Tensor:
    """``[S, 1, max_q, num_keys]`` bool: which cached keys each (padded) query of each sequence may read."""
    key_pos = torch.arange(num_keys, device=query_pos.device)
    distance = query_pos[:, None, :, None] - key_pos
    allowed = (key_pos < kv_lens[:, None, None, None]).expand_as(distance)
    if is_causal:
        allowed = allowed & (distance >= 0)
    if sliding_window is not None and sliding_window > 0:
        allowed = allowed & (distance < sliding_window)
    chunked = chunk_allowed(query_pos[:, None, :, None], key_pos, attention_chunk_size)
    if chunked is not None:
        allowed = allowed & chunked
    return allowed


def _check_paged(query: torch.Tensor, k_cache: torch.Tensor, query_start: torch.Tensor, block_tables) -> None:
    if query.shape[0] != 1:
        raise ValueError(f"paged attention takes a packed batch [1, T, ...], got batch {query.shape[0]}")
    if query_start.dim() != 1 or query_start.shape[0] != block_tables.shape[0] + 1:
        raise ValueError(
            f"query_start must be [S + 1] for the {block_tables.shape[0]} block tables, "
            f"got shape {list(query_start.shape)}"
        )
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, n_kv, d], got {list(k_cache.shape)}")


@torch.library.custom_op(f"{NAMESPACE}::{PAGED_ATTENTION}", mutates_args=("k_cache", "v_cache"))
def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    cached_lens: torch.Tensor,
    is_causal: bool = True,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    layout: str = "bnsd",
    attention_chunk_size: int | None = None,
) -> torch.Tensor:
    """``torch_attention`` over a paged KV cache, for a packed batch (see the module docstring).

    Reference implementation: writes the new keys/values, gathers each sequence's keys through its
    block table, pads the queries per sequence (except in a decode step, one token per sequence, which
    needs no host synchronisation) and attends with :func:`attend_bnsd`.
    """
    check_layout(layout)
    q, k, v = (to_bnsd(x, layout) for x in (query, key, value))  # [1, n, T, d]
    _check_paged(q, k_cache, query_start, block_tables)
    write_slots(k_cache, k[0].transpose(0, 1), slot_mapping)
    write_slots(v_cache, v[0].transpose(0, 1), slot_mapping)
    keys = gather_blocks(k_cache, block_tables).transpose(1, 2)  # [S, n_kv, L, d]
    values = gather_blocks(v_cache, block_tables).transpose(1, 2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.shape[2] == block_tables.shape[0]:  # one new token per sequence (a decode step): no padding
        mask = paged_mask(
            cached_lens[:, None],
            cached_lens + 1,
            keys.shape[2],
            is_causal,
            sliding_window,
            attention_chunk_size,
        )
        queries = q[0].transpose(0, 1)[:, :, None]  # [S, n, 1, d]
        out = attend_bnsd(queries, keys, values, scale, attn_mask=mask, sinks=sinks, logit_cap=logit_cap)
        packed = out[:, :, 0]  # [T, n, d_v]
    else:  # queries padded per sequence to the longest chunk
        new = query_start[1:] - query_start[:-1]
        offsets = torch.arange(int(new.max()), device=q.device)
        valid = offsets < new[:, None]  # [S, max_q]
        index = torch.where(valid, query_start[:-1, None] + offsets, 0)
        queries = q[0][:, index].transpose(0, 1)  # [S, n, max_q, d]
        positions = cached_lens[:, None] + offsets
        mask = paged_mask(
            positions, cached_lens + new, keys.shape[2], is_causal, sliding_window, attention_chunk_size
        )
        out = attend_bnsd(queries, keys, values, scale, attn_mask=mask, sinks=sinks, logit_cap=logit_cap)
        packed = out.transpose(1, 2)[valid]  # [T, n, d_v], in packed token order
    return packed[None].contiguous() if layout == "bsnd" else packed.transpose(0, 1)[None].contiguous()


@paged_attention.register_fake
def _paged_attention_fake(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    cached_lens: torch.Tensor,
    is_causal: bool = True,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    layout: str = "bnsd",
    attention_chunk_size: int | None = None,
) -> torch.Tensor:
    check_layout(layout)
    return query.new_empty(*query.shape[:-1], value.shape[-1])
