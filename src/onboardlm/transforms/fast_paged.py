"""Fast paged attention: the Triton paged kernels in place of the reference paged op where they can run.

:func:`fast_paged_attention` takes the arguments of ``onboardlm_paged_attention``
(:mod:`onboardlm.transforms.paged_ops`) and computes the same result. Where the Triton kernels can run
(CUDA with Triton, or ``TRITON_INTERPRET=1``; fp16/bf16; causal; no sinks, no logit cap, no chunked
attention; contiguous caches) it writes the step's keys and values to their slots (one indexed copy per
cache) and attends straight through each sequence's block table: no gathered copy of the cache, no
padding of the queries, no host synchronisation. The kernel is picked from the shapes alone:

- a step with prompt tokens (more query tokens than sequences) runs the flash-style prefill kernel
  :func:`onboardlm.kernels.paged_prefill.paged_prefill_attention` (query tiles of one sequence read each
  key tile once);
- a decode step (one token per sequence, the steps captured in CUDA graphs) runs the split-K kernel
  :func:`onboardlm.kernels.decode_attention.paged_decode_attention`, whose launch shapes are fixed by
  the tensors' shapes.

Elsewhere it calls the reference op.
:func:`use_fast_paged_attention` points a paged graph's attention nodes at it.
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule

from onboardlm.kernels import decode_attention as kernels
from onboardlm.kernels import paged_prefill
from onboardlm.ops._library import op_targets
from onboardlm.ops.attention import check_layout, to_bnsd
from onboardlm.transforms import paged_ops
from onboardlm.transforms.dump import dumps_graph


def _reference(*args: object, **kwargs: object) -> torch.Tensor:
    return paged_ops.paged_attention._init_fn(*args, **kwargs)


def kernel_runs(
    query: torch.Tensor, is_causal: bool, sinks: torch.Tensor | None, logit_cap: float | None
) -> bool:
    """Whether a Triton paged kernel computes this call (else the reference op does)."""
    no_cap = logit_cap is None or logit_cap <= 0
    return is_causal and sinks is None and no_cap and kernels.is_available(query)


def fast_paged_attention(
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
    """``onboardlm_paged_attention`` on the Triton paged kernels where they run (see the module docstring)."""
    if (
        not kernel_runs(query, is_causal, sinks, logit_cap)
        or not k_cache.is_contiguous()
        or attention_chunk_size
    ):
        return _reference(
            query, key, value, k_cache, v_cache, slot_mapping, block_tables, query_start, cached_lens,
            is_causal, scale, sinks, sliding_window, logit_cap, layout, attention_chunk_size,
        )  # fmt: skip
    check_layout(layout)
    q, k, v = (to_bnsd(x, layout)[0].transpose(0, 1) for x in (query, key, value))  # [T, n, d]
    for cache, new in ((k_cache, k), (v_cache, v)):  # value head dims may differ from key head dims
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, new.to(cache.dtype))
    if q.stride(-1) != 1:
        q = q.contiguous()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    window = sliding_window if sliding_window is not None and sliding_window > 0 else 0
    # More tokens than sequences: prompt tokens (a shape test, no synchronisation).
    kernel = (
        paged_prefill.paged_prefill_attention
        if q.shape[0] > block_tables.shape[0]
        else kernels.paged_decode_attention
    )
    out = kernel(q, k_cache, v_cache, block_tables, query_start, cached_lens, scale, window)  # [T, n, d_v]
    return out[None].contiguous() if layout == "bsnd" else out.transpose(0, 1)[None].contiguous()


@dumps_graph
def use_fast_paged_attention(gm: GraphModule) -> int:
    """Make every paged-attention node of ``gm`` call :func:`fast_paged_attention` (in place).

    Works before or after :func:`onboardlm.transforms.backends.use_direct_kernels`; returns the number
    of nodes changed.
    """
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and (
            node.target in op_targets(paged_ops.PAGED_ATTENTION) or node.target is fast_paged_attention
        ):
            node.target = fast_paged_attention
            changed += 1
    gm.graph.lint()
    gm.recompile()
    return changed
