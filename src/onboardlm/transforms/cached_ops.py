"""Cached attention ops that the KV-cache transform puts in place of the canonical attention ops.

Each op writes the new keys/values (or, for MLA, the compressed latent and the RoPE key) of every
sequence into its per-layer cache at that sequence's ``input_pos`` and attends over the cache.

Cache layout: ``[max_batch, max_seq, *features]``; batch row ``b`` of the call uses cache row ``b``.
The new tokens of sequence ``b`` sit at positions ``input_pos[b] .. input_pos[b] + s - 1``; a shorter
sequence is right-padded in the chunk, and causal masking keeps its padding away from its real
tokens (a padded slot is overwritten by the next real token). ``kv_len`` (at least
``max(input_pos) + s``) is how many cache positions the call reads. Masking, the sliding window,
the logit cap and sinks follow ``torch_attention`` with absolute positions: key ``j`` is allowed for
the query at position ``p`` iff ``j <= p`` (causal) and ``p - j < sliding_window`` (when set), and
``j // attention_chunk_size == p // attention_chunk_size`` (chunked local attention, when set).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from onboardlm.ops.attention import attend_bnsd, check_layout, from_bnsd, to_bnsd
from onboardlm.ops.sparse_attention import index_scores, select_top_keys

NAMESPACE = "auto_deploy"
CACHED_ATTENTION = "onboardlm_cached_attention"
CACHED_MLA = "onboardlm_cached_mla"
CACHED_LIGHTNING_INDEXER = "onboardlm_cached_lightning_indexer"


def write_cache(cache: torch.Tensor, new: torch.Tensor, input_pos: torch.Tensor) -> None:
    """Store ``new`` ``[b, s, *features]`` into ``cache`` rows ``0..b-1`` at ``input_pos[b] + arange(s)``."""
    b, s = new.shape[:2]
    if s == 1:
        cache[torch.arange(b, device=cache.device), input_pos] = new[:, 0]
        return
    rows = torch.arange(b, device=cache.device)[:, None].expand(b, s)
    cols = input_pos[:, None] + torch.arange(s, device=cache.device)
    cache.index_put_((rows, cols), new)


def chunk_allowed(
    q_pos: torch.Tensor, key_pos: torch.Tensor, attention_chunk_size: int | None
) -> torch.Tensor | None:
    """Chunked local attention (Llama 4): True where query and key positions share a chunk; None when
    ``attention_chunk_size`` is None or ``<= 0``."""
    if attention_chunk_size is None or attention_chunk_size <= 0:
        return None
    return q_pos // attention_chunk_size == key_pos // attention_chunk_size


def allowed_keys(
    input_pos: torch.Tensor,
    s_q: int,
    kv_len: int,
    is_causal: bool,
    sliding_window: int | None,
    attention_chunk_size: int | None = None,
) -> torch.Tensor:
    """``[b, 1, s_q, kv_len]`` bool: which cached keys each query of each sequence may attend to."""
    key_pos = torch.arange(kv_len, device=input_pos.device)
    q_pos = (input_pos[:, None] + torch.arange(s_q, device=input_pos.device))[:, None, :, None]
    distance = q_pos - key_pos
    if is_causal:
        allowed = distance >= 0
    else:  # every key written so far for this sequence, this chunk included
        allowed = (key_pos < (input_pos + s_q)[:, None, None, None]).expand(-1, 1, s_q, -1)
    if sliding_window is not None and sliding_window > 0:
        allowed = allowed & (distance < sliding_window)
    chunked = chunk_allowed(q_pos, key_pos, attention_chunk_size)
    if chunked is not None:
        allowed = allowed & chunked
    return allowed


def _check_cache(name: str, cache: torch.Tensor, batch: int, needed: int) -> None:
    if cache.shape[0] < batch or cache.shape[1] < needed:
        raise ValueError(
            f"{name} {list(cache.shape)} holds {cache.shape[0]} sequences of {cache.shape[1]} tokens; "
            f"this call needs {batch} sequences of {needed} tokens"
        )


@torch.library.custom_op(f"{NAMESPACE}::{CACHED_ATTENTION}", mutates_args=("k_cache", "v_cache"))
def cached_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    input_pos: torch.Tensor,
    kv_len: int,
    is_causal: bool = True,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    layout: str = "bnsd",
    attention_chunk_size: int | None = None,
) -> torch.Tensor:
    """``torch_attention`` over a KV cache: write ``key``/``value`` at ``input_pos``, attend over ``kv_len``.

    ``query``/``key``/``value`` are in ``layout``; caches are ``[max_batch, max_seq, n_kv, d]``.
    """
    check_layout(layout)
    q, k, v = (to_bnsd(x, layout) for x in (query, key, value))
    b, _, s_q, head_dim = q.shape
    _check_cache("k_cache", k_cache, b, kv_len)
    write_cache(k_cache, k.transpose(1, 2), input_pos)
    write_cache(v_cache, v.transpose(1, 2), input_pos)
    keys = k_cache[:b, :kv_len].transpose(1, 2)
    values = v_cache[:b, :kv_len].transpose(1, 2)
    mask = allowed_keys(input_pos, s_q, kv_len, is_causal, sliding_window, attention_chunk_size)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = attend_bnsd(q, keys, values, scale, attn_mask=mask, sinks=sinks, logit_cap=logit_cap)
    return from_bnsd(out, layout)


@cached_attention.register_fake
def _cached_attention_fake(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    input_pos: torch.Tensor,
    kv_len: int,
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


@torch.library.custom_op(f"{NAMESPACE}::{CACHED_MLA}", mutates_args=("ckv_cache", "kpe_cache"))
def cached_mla(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    compressed_kv: torch.Tensor,
    kpe: torch.Tensor,
    kv_b_proj_weight: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    input_pos: torch.Tensor,
    kv_len: int,
    is_causal: bool = True,
    scale: float | None = None,
    layout: str = "bsnd",
    index_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch_mla`` over a latent cache: ``ckv_cache`` ``[max_b, max_s, rank]``, ``kpe_cache`` ``[.., 1, rope]``.

    The compressed latent and the (already rotated) RoPE key are cached; ``kv_b_proj`` expands the
    cached latent on every call, as ``torch_mla`` does for its inputs. ``index_mask`` (bool
    ``[b, 1, s, kv_len]``, from the cached lightning indexer) narrows the keys as in ``torch_sparse_mla``.
    """
    check_layout(layout)
    q_nope_v, q_pe_v = to_bnsd(q_nope, layout), to_bnsd(q_pe, layout)
    b, n_heads, s_q, nope_dim = q_nope_v.shape
    _check_cache("ckv_cache", ckv_cache, b, kv_len)
    write_cache(ckv_cache, compressed_kv, input_pos)
    write_cache(kpe_cache, to_bnsd(kpe, layout).transpose(1, 2), input_pos)
    v_head_dim = kv_b_proj_weight.shape[0] // n_heads - nope_dim
    kv = F.linear(ckv_cache[:b, :kv_len], kv_b_proj_weight).view(b, kv_len, n_heads, nope_dim + v_head_dim)
    k_nope, values = kv.transpose(1, 2).split([nope_dim, v_head_dim], dim=-1)
    k_pe = kpe_cache[:b, :kv_len].transpose(1, 2)
    query = torch.cat([q_nope_v, q_pe_v], dim=-1)
    keys = torch.cat([k_nope, k_pe.expand(b, n_heads, kv_len, k_pe.shape[-1])], dim=-1)
    mask = allowed_keys(input_pos, s_q, kv_len, is_causal, None)
    if index_mask is not None:
        mask = mask & index_mask
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    return from_bnsd(attend_bnsd(query, keys, values, scale, attn_mask=mask), layout)


@cached_mla.register_fake
def _cached_mla_fake(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    compressed_kv: torch.Tensor,
    kpe: torch.Tensor,
    kv_b_proj_weight: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    input_pos: torch.Tensor,
    kv_len: int,
    is_causal: bool = True,
    scale: float | None = None,
    layout: str = "bsnd",
    index_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    check_layout(layout)
    n_heads = to_bnsd(q_nope, layout).shape[1]
    v_head_dim = kv_b_proj_weight.shape[0] // n_heads - q_nope.shape[-1]
    return q_nope.new_empty(*q_nope.shape[:-1], v_head_dim)


@torch.library.custom_op(f"{NAMESPACE}::{CACHED_LIGHTNING_INDEXER}", mutates_args=("k_cache",))
def cached_lightning_indexer(
    index_q: torch.Tensor,
    index_k: torch.Tensor,
    index_weights: torch.Tensor,
    k_cache: torch.Tensor,
    input_pos: torch.Tensor,
    kv_len: int,
    index_topk: int,
    scale: float | None = None,
    is_causal: bool = True,
) -> torch.Tensor:
    """``torch_lightning_indexer`` over an indexer-key cache ``[max_b, max_s, D]``: write ``index_k`` at
    ``input_pos``, score the ``kv_len`` cached keys, return bool ``[b, 1, s, kv_len]`` (the keys each
    query attends to, causal by absolute position)."""
    b, s_q = index_q.shape[:2]
    _check_cache("index k_cache", k_cache, b, kv_len)
    write_cache(k_cache, index_k, input_pos)
    scale = 1.0 / math.sqrt(index_q.shape[-1]) if scale is None else scale
    scores = index_scores(index_q, k_cache[:b, :kv_len], index_weights, scale)
    allowed = allowed_keys(input_pos, s_q, kv_len, is_causal, None)[:, 0]
    return select_top_keys(scores, allowed, index_topk)


@cached_lightning_indexer.register_fake
def _cached_lightning_indexer_fake(
    index_q: torch.Tensor,
    index_k: torch.Tensor,
    index_weights: torch.Tensor,
    k_cache: torch.Tensor,
    input_pos: torch.Tensor,
    kv_len: int,
    index_topk: int,
    scale: float | None = None,
    is_causal: bool = True,
) -> torch.Tensor:
    b, s_q = index_q.shape[:2]
    return index_q.new_empty(b, 1, s_q, kv_len, dtype=torch.bool)
