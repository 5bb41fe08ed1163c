"""Split-K decode attention in Triton: one query token per sequence over a long KV cache.

A decode step has one query per head, so an attention kernel built for long queries (cuDNN / flash
SDPA) leaves most of the GPU idle: on an H200 it took 45 us per layer to read 1.3 MB of cache. This
kernel spreads the keys of every (sequence, KV head) pair over ``n_splits`` programs:

1. ``_partial_kernel``: each program loads the query heads of one KV head (the GQA group, padded to
   16 rows for ``tl.dot``) and walks its slice of the cache in ``BLOCK_N`` tiles, keeping an online
   softmax (running max ``m``, running sum ``l``, unnormalised output ``acc``) in fp32. It reads only
   the keys a sequence may attend to (``lo <= key <= input_pos``, ``lo`` set by a sliding window), so
   a step costs what the valid prefix costs, while every shape stays fixed for CUDA-graph capture.
2. ``_combine_kernel``: one program per (sequence, head) merges the splits' partial results.

Before them ``_store_kernel`` writes the step's new key and value into the cache (one launch each,
where indexed assignment takes two kernels).

:func:`decode_attention` is registered as the custom op ``onboardlm::decode_attention`` so that
``torch.compile`` treats it as one opaque call. Triton is optional: :func:`is_available` says whether
the kernel can run (a CUDA tensor and an importable Triton, or ``TRITON_INTERPRET=1`` on the CPU,
which is how it is tested without a GPU).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch do not bring Triton; the SDPA path is used instead
    triton = None

#: Dtypes the kernel takes (``tl.dot`` on fp32 would silently use TF32).
DTYPES = (torch.bfloat16, torch.float16)
#: Largest head dimension the kernel keeps in registers.
MAX_HEAD_DIM = 256
#: Keys per tile of the inner loop.
BLOCK_N = 64


def is_available(query: torch.Tensor) -> bool:
    """Whether the kernel can compute attention for ``query`` on its device."""
    if triton is None or query.dtype not in DTYPES or query.shape[-1] > MAX_HEAD_DIM:
        return False
    return query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _partial_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, acc_ptr, m_ptr, l_ptr,
        stride_qb, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        n_heads, n_splits, split_len, qk_scale, window,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_K: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_V: tl.constexpr, BLOCK_V: tl.constexpr,
    ):  # fmt: skip
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        pos = tl.load(pos_ptr + seq)
        start = tl.maximum(split * split_len, pos + 1 - window)  # window > pos when there is none
        end = tl.minimum((split + 1) * split_len, pos + 1)

        rows = tl.arange(0, BLOCK_G)
        heads = kv_head * GROUP + rows
        row_ok = rows < GROUP
        dk = tl.arange(0, BLOCK_K)
        dv = tl.arange(0, BLOCK_V)
        q = tl.load(
            q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dk[None, :],
            mask=row_ok[:, None] & (dk[None, :] < HEAD_K),
            other=0.0,
        )
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_V], tl.float32)
        k_base = k_ptr + seq * stride_kb + kv_head * stride_kh
        v_base = v_ptr + seq * stride_vb + kv_head * stride_vh
        for first in range(start, end, BLOCK_N):
            keys = first + tl.arange(0, BLOCK_N)
            key_ok = keys < end
            k = tl.load(
                k_base + keys[:, None] * stride_ks + dk[None, :],
                mask=key_ok[:, None] & (dk[None, :] < HEAD_K),
                other=0.0,
            )
            scores = tl.dot(q, tl.trans(k)) * qk_scale  # log2 domain: qk_scale includes log2(e)
            scores = tl.where(key_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            alpha = tl.math.exp2(m - m_new)
            p = tl.math.exp2(scores - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(
                v_base + keys[:, None] * stride_vs + dv[None, :],
                mask=key_ok[:, None] & (dv[None, :] < HEAD_V),
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new

        row = (seq * n_heads + heads) * n_splits + split
        tl.store(m_ptr + row, m, mask=row_ok)
        tl.store(l_ptr + row, total, mask=row_ok)
        tl.store(
            acc_ptr + row[:, None] * HEAD_V + dv[None, :],
            acc,
            mask=row_ok[:, None] & (dv[None, :] < HEAD_V),
        )

    @triton.jit
    def _store_kernel(
        new_ptr, cache_ptr, pos_ptr, stride_nb, stride_nh, stride_cb, stride_cs, stride_ch,
        HEAD: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        seq = tl.program_id(0)
        head = tl.program_id(1)
        pos = tl.load(pos_ptr + seq)
        d = tl.arange(0, BLOCK)
        row = tl.load(new_ptr + seq * stride_nb + head * stride_nh + d, mask=d < HEAD)
        tl.store(cache_ptr + seq * stride_cb + pos * stride_cs + head * stride_ch + d, row, mask=d < HEAD)

    @triton.jit
    def _combine_kernel(
        acc_ptr, m_ptr, l_ptr, out_ptr, n_splits,
        HEAD_V: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)  # sequence * n_heads + head
        splits = tl.arange(0, BLOCK_S)
        split_ok = splits < n_splits
        dv = tl.arange(0, BLOCK_V)
        m = tl.load(m_ptr + row * n_splits + splits, mask=split_ok, other=float("-inf"))
        total = tl.load(l_ptr + row * n_splits + splits, mask=split_ok, other=0.0)
        m_max = tl.max(m, 0)
        weight = tl.where(split_ok & (total > 0), tl.math.exp2(m - m_max), 0.0)
        acc = tl.load(
            acc_ptr + (row * n_splits + splits)[:, None] * HEAD_V + dv[None, :],
            mask=(weight > 0)[:, None] & (dv[None, :] < HEAD_V),
            other=0.0,
        )
        out = tl.sum(acc * weight[:, None], 0) / tl.sum(total * weight, 0)
        tl.store(out_ptr + row * HEAD_V + dv, out.to(out_ptr.dtype.element_ty), mask=dv < HEAD_V)

    # Integer arguments that vary from step to step are not specialised (a value of 1 or a multiple of
    # 16 would otherwise compile a new kernel in the middle of serving).
    @triton.jit(
        do_not_specialize=[
            "stride_qt", "stride_table", "n_seqs", "n_splits", "split_len", "window",
        ]
    )  # fmt: skip
    def _paged_partial_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, starts_ptr, cached_ptr, acc_ptr, m_ptr, l_ptr,
        stride_qt, stride_qh, stride_table, stride_kslot, stride_kh, stride_vslot, stride_vh,
        n_seqs, n_heads, n_splits, split_len, qk_scale, window,
        BLOCK_SIZE: tl.constexpr,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_K: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_V: tl.constexpr, BLOCK_V: tl.constexpr,
    ):  # fmt: skip
        """Like ``_partial_kernel`` for packed token ``program_id(0)``, its keys read through its
        sequence's block table (sequence and position found from ``query_start`` and ``cached_lens``)."""
        token = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        lo = n_seqs * 0  # the sequence owning the token: the last lo with query_start[lo] <= token
        hi = n_seqs
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if tl.load(starts_ptr + mid) <= token:
                lo = mid
            else:
                hi = mid
        seq = lo
        pos = tl.load(cached_ptr + seq) + token - tl.load(starts_ptr + seq)
        start = tl.maximum(split * split_len, pos + 1 - window)
        end = tl.minimum((split + 1) * split_len, pos + 1)

        rows = tl.arange(0, BLOCK_G)
        heads = kv_head * GROUP + rows
        row_ok = rows < GROUP
        dk = tl.arange(0, BLOCK_K)
        dv = tl.arange(0, BLOCK_V)
        q = tl.load(
            q_ptr + token * stride_qt + heads[:, None] * stride_qh + dk[None, :],
            mask=row_ok[:, None] & (dk[None, :] < HEAD_K),
            other=0.0,
        )
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_V], tl.float32)
        table = tables_ptr + seq * stride_table
        for first in range(start, end, BLOCK_N):
            keys = first + tl.arange(0, BLOCK_N)
            key_ok = keys < end
            block = tl.load(table + keys // BLOCK_SIZE, mask=key_ok, other=0)
            slot = (block * BLOCK_SIZE + keys % BLOCK_SIZE).to(tl.int64)
            k = tl.load(
                k_ptr + slot[:, None] * stride_kslot + kv_head * stride_kh + dk[None, :],
                mask=key_ok[:, None] & (dk[None, :] < HEAD_K),
                other=0.0,
            )
            scores = tl.dot(q, tl.trans(k)) * qk_scale  # log2 domain: qk_scale includes log2(e)
            scores = tl.where(key_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            alpha = tl.math.exp2(m - m_new)
            p = tl.math.exp2(scores - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(
                v_ptr + slot[:, None] * stride_vslot + kv_head * stride_vh + dv[None, :],
                mask=key_ok[:, None] & (dv[None, :] < HEAD_V),
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new

        row = (token * n_heads + heads) * n_splits + split
        tl.store(m_ptr + row, m, mask=row_ok)
        tl.store(l_ptr + row, total, mask=row_ok)
        tl.store(
            acc_ptr + row[:, None] * HEAD_V + dv[None, :],
            acc,
            mask=row_ok[:, None] & (dv[None, :] < HEAD_V),
        )


def _n_splits(device: torch.device, programs: int, kv_len: int) -> int:
    """Splits per (sequence, KV head): about two programs per SM, at least one tile per split."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(triton.cdiv(kv_len, BLOCK_N), triton.cdiv(2 * sms, programs)))


def _store(new: torch.Tensor, cache: torch.Tensor, input_pos: torch.Tensor) -> None:
    """``cache[i, input_pos[i]] = new[i]`` for every sequence ``i`` of ``new`` ``[b, n_kv, d]``."""
    b, n_kv, head = new.shape
    _store_kernel[(b, n_kv)](
        new, cache, input_pos, new.stride(0), new.stride(1), cache.stride(0), cache.stride(1), cache.stride(2),
        HEAD=head, BLOCK=triton.next_power_of_2(head),
    )  # fmt: skip


@torch.library.custom_op("onboardlm::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    input_pos: torch.Tensor,
    kv_len: int,
    scale: float,
    sliding_window: int = 0,
) -> torch.Tensor:
    """One decode step: store ``key``/``value`` ``[b, n_kv, d]`` at ``input_pos`` ``[b]``, then attend.

    ``query`` is ``[b, n_heads, d]``; caches are ``[max_batch, max_seq, n_kv, d]`` (last dims
    contiguous), row ``i`` holding sequence ``i`` (the contract of
    :mod:`onboardlm.transforms.cached_ops`). Sequence ``i`` attends to keys
    ``max(0, input_pos[i] + 1 - sliding_window) .. input_pos[i]`` (no window when ``sliding_window``
    <= 0), all below ``kv_len``. Returns ``[b, n_heads, d_v]`` in the query's dtype.
    """
    b, n_heads, head_k = query.shape
    n_kv, head_v = k_cache.shape[2], v_cache.shape[3]
    group = n_heads // n_kv
    if any(x.stride(-1) != 1 for x in (query, key, value, k_cache, v_cache)):
        raise ValueError("decode_attention needs the last dim of its tensors contiguous")
    _store(key, k_cache, input_pos)
    _store(value, v_cache, input_pos)
    n_splits = _n_splits(query.device, b * n_kv, kv_len)
    split_len = triton.cdiv(triton.cdiv(kv_len, n_splits), BLOCK_N) * BLOCK_N
    n_splits = triton.cdiv(kv_len, split_len)
    partial = torch.empty(b, n_heads, n_splits, head_v, dtype=torch.float32, device=query.device)
    m = torch.empty(b, n_heads, n_splits, dtype=torch.float32, device=query.device)
    total = torch.empty_like(m)
    _partial_kernel[(b, n_kv, n_splits)](
        query, k_cache, v_cache, input_pos, partial, m, total,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        n_heads, n_splits, split_len, scale * 1.4426950408889634,
        sliding_window if sliding_window > 0 else kv_len + 1,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N,
        HEAD_K=head_k, BLOCK_K=max(16, triton.next_power_of_2(head_k)),
        HEAD_V=head_v, BLOCK_V=max(16, triton.next_power_of_2(head_v)),
    )  # fmt: skip
    out = query.new_empty(b, n_heads, head_v)
    _combine_kernel[(b * n_heads,)](
        partial, m, total, out, n_splits,
        HEAD_V=head_v, BLOCK_V=max(16, triton.next_power_of_2(head_v)),
        BLOCK_S=max(2, triton.next_power_of_2(n_splits)),
    )  # fmt: skip
    return out


@decode_attention.register_fake
def _decode_attention_fake(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    input_pos: torch.Tensor,
    kv_len: int,
    scale: float,
    sliding_window: int = 0,
) -> torch.Tensor:
    return query.new_empty(*query.shape[:-1], v_cache.shape[-1])


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    cached_lens: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
) -> torch.Tensor:
    """Causal attention of a packed batch over a paged cache that already holds the step's keys/values.

    ``query`` is ``[T, n_heads, d]`` (last dim contiguous): token ``t`` belongs to the sequence ``i``
    with ``query_start[i] <= t < query_start[i + 1]`` and sits at position ``cached_lens[i] + t -
    query_start[i]``; it attends to that sequence's keys ``max(0, pos + 1 - sliding_window) .. pos``
    (no window when ``sliding_window`` <= 0), read through ``block_tables[i]`` from the caches
    ``[num_blocks, block_size, n_kv, d]`` (contiguous). Every token is computed like a decode query
    (split-K over its keys, see the module docstring), so the launch shapes depend only on ``T``, the
    number of sequences and the block tables' width, never on the values: a step can be captured in a
    CUDA graph. Returns ``[T, n_heads, d_v]`` in the query's dtype.
    """
    tokens, n_heads, head_k = query.shape
    block_size, n_kv, head_v = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    if query.stride(-1) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(
            "paged_decode_attention needs a query with a contiguous last dim and contiguous caches"
        )
    kv_len = block_tables.shape[1] * block_size
    n_splits = _n_splits(query.device, tokens * n_kv, kv_len)
    split_len = triton.cdiv(triton.cdiv(kv_len, n_splits), BLOCK_N) * BLOCK_N
    n_splits = triton.cdiv(kv_len, split_len)
    partial = torch.empty(tokens, n_heads, n_splits, head_v, dtype=torch.float32, device=query.device)
    m = torch.empty(tokens, n_heads, n_splits, dtype=torch.float32, device=query.device)
    total = torch.empty_like(m)
    _paged_partial_kernel[(tokens, n_kv, n_splits)](
        query, k_cache, v_cache, block_tables, query_start, cached_lens, partial, m, total,
        query.stride(0), query.stride(1), block_tables.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        block_tables.shape[0], n_heads, n_splits, split_len, scale * 1.4426950408889634,
        sliding_window if sliding_window > 0 else kv_len + 1,
        BLOCK_SIZE=block_size, GROUP=n_heads // n_kv, BLOCK_G=max(16, triton.next_power_of_2(n_heads // n_kv)),
        BLOCK_N=BLOCK_N, HEAD_K=head_k, BLOCK_K=max(16, triton.next_power_of_2(head_k)),
        HEAD_V=head_v, BLOCK_V=max(16, triton.next_power_of_2(head_v)),
    )  # fmt: skip
    out = query.new_empty(tokens, n_heads, head_v)
    _combine_kernel[(tokens * n_heads,)](
        partial, m, total, out, n_splits,
        HEAD_V=head_v, BLOCK_V=max(16, triton.next_power_of_2(head_v)),
        BLOCK_S=max(2, triton.next_power_of_2(n_splits)),
    )  # fmt: skip
    return out
