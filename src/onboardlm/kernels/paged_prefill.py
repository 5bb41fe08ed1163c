"""Flash-style prefill attention in Triton over a paged KV cache: prompt chunks read their keys once per tile.

A packed step (see :mod:`onboardlm.transforms.paged_ops`) holds the new tokens of several sequences
one after another. :func:`onboardlm.kernels.decode_attention.paged_decode_attention` gives every token
its own programs, so a 1024-token prompt reads its keys about 1024 times. Here one program takes a
*query tile*: ``rows`` consecutive tokens of ONE sequence times ``heads`` query heads of one KV head
(``BLOCK_M = rows * heads`` rows of ``tl.dot``; ``heads`` is the GQA group or 1). It walks the
sequence's keys in ``BLOCK_N`` tiles through its block table, with an online softmax in fp32 (running
max, running sum, unnormalised output), and masks each row causally by its absolute position
(``cached_lens[i] + t - query_start[i]``) and by the sliding window. The keys a tile reads span from
the window start of its first token to its last token, so the keys of a tile are read once for all of
its rows; only the key tiles at the ends of that span (the diagonal, the window's edge) are masked, the
key tiles every row may read run without the mask.

Tiles never straddle sequences, and the tile of each program is found on the device: sequence ``i``
owns the virtual tiles ``query_start[i] // rows + i`` up to (excluded) the same value of ``i + 1``, at
least ``cdiv(new_i, rows)`` of them; each program finds its sequence by a binary search on that key and
programs past their sequence's last token store nothing. The grid is the bound ``T // rows + S``, fixed
by the shapes: no host synchronisation, no extra launches. Tiles start in reverse order, so that a
prompt's last tiles (the most keys under the causal mask) do not run alone at the end.

The launch configuration (tile sizes, warps, pipeline stages) comes from :func:`launch_config`, a small
table by head dimension; :class:`PrefillConfig` overrides it (the GPU probe
``benchmarks/paged_prefill_probe.py`` compares a few).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from onboardlm.kernels.decode_attention import MAX_HEAD_DIM, triton

if triton is not None:
    import triton.language as tl


@dataclass(frozen=True)
class PrefillConfig:
    """One launch configuration: ``block_m`` rows (tokens x heads) per program, ``block_n`` keys per
    tile, ``group_heads``: a program takes the GQA group's query heads (``block_m // group`` tokens; a
    decode token fills ``group`` rows instead of one), else one head (``block_m`` tokens)."""

    block_m: int = 128
    block_n: int = 64
    group_heads: bool = True
    num_warps: int = 8
    num_stages: int = 2


#: Configurations by largest head dimension (k or v): the first entry whose bound is >= it. Compiled for
#: sm_90 (Triton 3.9), none spills registers; the H200 probe compares alternatives for head dim 128.
CONFIGS: tuple[tuple[int, PrefillConfig], ...] = (
    (64, PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)),
    (128, PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)),
    (MAX_HEAD_DIM, PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)),
)


def launch_config(head_dim: int) -> PrefillConfig:
    """The default launch configuration for the larger of the key and value head dimensions."""
    return next(config for bound, config in CONFIGS if head_dim <= bound)


if triton is not None:

    @triton.jit
    def _attend(
        q, m, total, acc, k_base, v_base, table, positions, stride_kslot, stride_vslot, qk_scale, window,
        lo, hi, key_end,
        MASKED: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_K: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_V: tl.constexpr, BLOCK_V: tl.constexpr,
    ):  # fmt: skip
        """The online softmax over the key tiles from ``lo`` to ``hi`` (``MASKED``: keys past ``key_end``,
        after a row's position or outside its window are left out; else every key is allowed)."""
        dk = tl.arange(0, BLOCK_K)
        dv = tl.arange(0, BLOCK_V)
        for start in range(lo, hi, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            key_ok = keys < key_end
            block = tl.load(table + keys // BLOCK_SIZE, mask=key_ok, other=0)
            slot = (block * BLOCK_SIZE + keys % BLOCK_SIZE).to(tl.int64)
            k = tl.load(
                k_base + slot[:, None] * stride_kslot + dk[None, :],
                mask=key_ok[:, None] & (dk[None, :] < HEAD_K),
                other=0.0,
            )
            scores = tl.dot(q, tl.trans(k)) * qk_scale  # log2 domain: qk_scale includes log2(e)
            if MASKED:
                distance = positions[:, None] - keys[None, :]
                scores = tl.where((distance >= 0) & (distance < window), scores, float("-inf"))
                m_new = tl.maximum(m, tl.max(scores, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key allowed yet
            else:
                m_new = tl.maximum(m, tl.max(scores, 1))
                m_safe = m_new
            alpha = tl.math.exp2(m - m_safe)
            p = tl.math.exp2(scores - m_safe[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(
                v_base + slot[:, None] * stride_vslot + dv[None, :],
                mask=key_ok[:, None] & (dv[None, :] < HEAD_V),
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        return m, total, acc

    # Values that change from step to step are not specialised (a value of 1 or a multiple of 16 would
    # otherwise compile another kernel in the middle of serving). The query's strides are specialised: a
    # multiple of 16 lets it load in vectors, and with a head dim that is a multiple of 16 they always are.
    @triton.jit(do_not_specialize=["stride_table", "n_seqs", "window"])
    def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, starts_ptr, cached_ptr,
        stride_qt, stride_qh, stride_table, stride_kslot, stride_kh, stride_vslot, stride_vh,
        stride_ot, stride_oh,
        n_seqs, qk_scale, window,
        BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEADS: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_K: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_V: tl.constexpr, BLOCK_V: tl.constexpr,
    ):  # fmt: skip
        """Query tile ``program_id(0)`` (``ROWS`` tokens x ``HEADS`` heads) of head block ``program_id(1)``."""
        tile = tl.num_programs(0) - 1 - tl.program_id(0)  # last tiles (the most keys) start first
        head_block = tl.program_id(1)
        kv_head = head_block * HEADS // GROUP
        lo = n_seqs * 0  # the sequence owning the tile: the last lo with query_start[lo] // ROWS + lo <= tile
        hi = n_seqs
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if tl.load(starts_ptr + mid).to(tl.int32) // ROWS + mid <= tile:
                lo = mid
            else:
                hi = mid
        seq = lo
        q_begin = tl.load(starts_ptr + seq).to(tl.int32)
        q_end = tl.load(starts_ptr + seq + 1).to(tl.int32)
        first = q_begin + (tile - q_begin // ROWS - seq) * ROWS  # the tile's first packed token
        last = tl.minimum(first + ROWS, q_end) - 1  # < first for a surplus tile
        offset = tl.load(cached_ptr + seq).to(tl.int32) - q_begin  # position of packed token t: t + offset

        rows = tl.arange(0, BLOCK_M)
        tokens = first + rows // HEADS
        heads = head_block * HEADS + rows % HEADS
        row_ok = (rows < ROWS * HEADS) & (tokens <= last)
        positions = tokens + offset
        dk = tl.arange(0, BLOCK_K)
        q = tl.load(
            q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + dk[None, :],
            mask=row_ok[:, None] & (dk[None, :] < HEAD_K),
            other=0.0,
        )
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        # Keys of the tile: from the window start of its first token to its last token, in BLOCK_N tiles
        # from a multiple of BLOCK_N. Those in [full_lo, full_hi) are allowed for every row (no mask).
        first_pos = first + offset
        key_end = last + offset + 1
        key_start = tl.minimum(tl.maximum(first_pos + 1 - window, 0) // BLOCK_N * BLOCK_N, key_end)
        full_lo = (tl.maximum(key_end - window, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        full_lo = tl.minimum(tl.maximum(full_lo, key_start), key_end)
        full_hi = tl.maximum((first_pos + 1) // BLOCK_N * BLOCK_N, full_lo)
        table = tables_ptr + seq * stride_table
        k_base = k_ptr + kv_head * stride_kh
        v_base = v_ptr + kv_head * stride_vh
        m, total, acc = _attend(
            q, m, total, acc, k_base, v_base, table, positions, stride_kslot, stride_vslot, qk_scale, window,
            key_start, full_lo, key_end, True, BLOCK_SIZE, BLOCK_N, HEAD_K, BLOCK_K, HEAD_V, BLOCK_V,
        )  # fmt: skip
        m, total, acc = _attend(
            q, m, total, acc, k_base, v_base, table, positions, stride_kslot, stride_vslot, qk_scale, window,
            full_lo, full_hi, key_end, False, BLOCK_SIZE, BLOCK_N, HEAD_K, BLOCK_K, HEAD_V, BLOCK_V,
        )  # fmt: skip
        m, total, acc = _attend(
            q, m, total, acc, k_base, v_base, table, positions, stride_kslot, stride_vslot, qk_scale, window,
            full_hi, key_end, key_end, True, BLOCK_SIZE, BLOCK_N, HEAD_K, BLOCK_K, HEAD_V, BLOCK_V,
        )  # fmt: skip

        out = (acc / tl.where(total > 0, total, 1.0)[:, None]).to(out_ptr.dtype.element_ty)
        dv = tl.arange(0, BLOCK_V)
        out_ptrs = out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh + dv[None, :]
        tl.store(out_ptrs, out, mask=row_ok[:, None] & (dv[None, :] < HEAD_V))


def paged_prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    cached_lens: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Causal attention of a packed batch over a paged cache that already holds the step's keys/values.

    Same contract as :func:`onboardlm.kernels.decode_attention.paged_decode_attention`: ``query``
    ``[T, n_heads, d]`` (last dim contiguous), token ``t`` of sequence ``i`` (``query_start[i] <= t <
    query_start[i + 1]``) at position ``cached_lens[i] + t - query_start[i]`` attends to that sequence's
    keys ``max(0, pos + 1 - sliding_window) .. pos`` (no window when ``sliding_window`` <= 0) through
    ``block_tables[i]`` in the contiguous caches ``[num_blocks, block_size, n_kv, d]``. Computed by query
    tiles (see the module docstring); ``config`` overrides :func:`launch_config`. Returns ``[T, n_heads,
    d_v]`` in the query's dtype.
    """
    tokens, n_heads, head_k = query.shape
    block_size, n_kv, head_v = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    if query.stride(-1) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(
            "paged_prefill_attention needs a query with a contiguous last dim and contiguous caches"
        )
    if n_heads % n_kv:
        raise ValueError(
            f"paged_prefill_attention: {n_heads} query heads are not a multiple of {n_kv} KV heads"
        )
    config = config or launch_config(max(head_k, head_v))
    group = n_heads // n_kv
    heads = group if config.group_heads and group <= config.block_m else 1
    rows = config.block_m // heads
    n_seqs = block_tables.shape[0]
    out = query.new_empty(tokens, n_heads, head_v)
    kv_len = block_tables.shape[1] * block_size
    _prefill_kernel[(tokens // rows + n_seqs, n_heads // heads)](
        query, k_cache, v_cache, out, block_tables, query_start, cached_lens,
        query.stride(0), query.stride(1), block_tables.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        n_seqs, scale * 1.4426950408889634, sliding_window if sliding_window > 0 else kv_len + 1,
        BLOCK_SIZE=block_size, GROUP=group, HEADS=heads, ROWS=rows,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        HEAD_K=head_k, BLOCK_K=max(16, triton.next_power_of_2(head_k)),
        HEAD_V=head_v, BLOCK_V=max(16, triton.next_power_of_2(head_v)),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
