"""Fast cached attention: PyTorch SDPA kernels in place of the reference cached attention.

:func:`fast_cached_attention` computes exactly what ``onboardlm_cached_attention`` does (same
arguments, same cache contract, see :mod:`onboardlm.transforms.cached_ops`) with
``F.scaled_dot_product_attention``, which dispatches to flash / memory-efficient kernels on CUDA and
runs everywhere (so its equivalence to the reference is tested on CPU):

- fresh prefill (``kv_len == s_q``, hence every ``input_pos`` is 0): attention over the new keys and
  values themselves, causal, GQA without copying K/V (``enable_gqa``); a sliding window adds a mask;
- decode (``s_q == 1``): on CUDA with Triton, the split-K kernel of
  :mod:`onboardlm.kernels.decode_attention`, which reads only each sequence's valid prefix. Otherwise
  SDPA: the query heads of each KV head are folded into the query-length axis (``[b, n_kv, group,
  d]``), so the KV heads are read once, and a ``[b, 1, 1, kv_len]`` mask keeps each sequence to its own
  valid prefix. Either way shapes depend only on ``kv_len``, not on the values of ``input_pos``, so a
  decode step with a fixed ``kv_len`` can be captured in a CUDA graph;
- anything else (a chunk appended to a filled cache): masked SDPA over the cache prefix.

Logit soft-capping and attention sinks have no SDPA kernel: those calls run the reference op.
:func:`use_fast_attention` rewrites a cached graph to call this function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from onboardlm.kernels import decode_attention as decode_kernel
from onboardlm.ops._library import op_targets
from onboardlm.ops.attention import check_layout, from_bnsd, to_bnsd
from onboardlm.transforms import cached_ops
from onboardlm.transforms.dump import dumps_graph


def _reference(*args: object, **kwargs: object) -> torch.Tensor:
    """The reference cached attention's Python implementation (no dispatcher round trip)."""
    return cached_ops.cached_attention._init_fn(*args, **kwargs)


def has_fast_path(sinks: torch.Tensor | None, logit_cap: float | None) -> bool:
    """Whether SDPA can compute the call: no sinks and no logit cap."""
    return sinks is None and not (logit_cap is not None and logit_cap > 0)


def _window(sliding_window: int | None) -> int | None:
    return sliding_window if sliding_window is not None and sliding_window > 0 else None


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float, window: int | None
) -> torch.Tensor:
    """Attention of a fresh prompt chunk over itself (positions ``0 .. s-1``)."""
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=True)
    s = q.shape[2]
    distance = torch.arange(s, device=q.device)[:, None] - torch.arange(s, device=q.device)
    allowed = distance < window
    if is_causal:
        allowed = allowed & (distance >= 0)
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, _repeat_kv(k, groups), _repeat_kv(v, groups), attn_mask=allowed, scale=scale
    )


def _decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    input_pos: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """One query token per sequence at ``input_pos`` over cached ``[b, n_kv, kv_len, d]`` keys/values."""
    b, n_heads, _, head_dim = q.shape
    n_kv, kv_len = keys.shape[1], keys.shape[2]
    distance = input_pos[:, None] - torch.arange(kv_len, device=q.device)
    allowed = distance >= 0  # a decode token is causal either way: the cache holds no later keys
    if window is not None:
        allowed = allowed & (distance < window)
    grouped = q.reshape(b, n_kv, n_heads // n_kv, head_dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=allowed[:, None, None], scale=scale)
    return out.reshape(b, n_heads, 1, values.shape[-1])


def _chunk(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    input_pos: torch.Tensor,
    is_causal: bool,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """A chunk of ``s_q`` new tokens over the cache prefix (masked SDPA)."""
    allowed = cached_ops.allowed_keys(input_pos, q.shape[2], keys.shape[2], is_causal, window)
    groups = q.shape[1] // keys.shape[1]
    return F.scaled_dot_product_attention(
        q, _repeat_kv(keys, groups), _repeat_kv(values, groups), attn_mask=allowed, scale=scale
    )


def fast_cached_attention(
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
    *,
    decode_kernel_allowed: bool = True,
) -> torch.Tensor:
    """``onboardlm_cached_attention`` on SDPA kernels (reference op for sinks and logit caps).

    ``decode_kernel_allowed=False`` keeps one-token steps on SDPA even where the Triton kernel runs.
    """
    if not has_fast_path(sinks, logit_cap) or attention_chunk_size:  # chunks: the reference's mask
        return _reference(
            query, key, value, k_cache, v_cache, input_pos, kv_len,
            is_causal, scale, sinks, sliding_window, logit_cap, layout, attention_chunk_size,
        )  # fmt: skip
    check_layout(layout)
    q, k, v = (to_bnsd(x, layout) for x in (query, key, value))
    b, _, s_q, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    window = _window(sliding_window)
    if s_q == 1 < kv_len and decode_kernel_allowed and decode_kernel.is_available(q):
        out = decode_kernel.decode_attention(
            q[:, :, 0], k[:, :, 0], v[:, :, 0], k_cache, v_cache, input_pos, kv_len, scale, window or 0
        )
        return from_bnsd(out[:, :, None], layout)
    if s_q == kv_len:  # a fresh prompt fills positions 0 .. s_q - 1: a plain copy, no index tensors
        k_cache[:b, :s_q].copy_(k.transpose(1, 2))
        v_cache[:b, :s_q].copy_(v.transpose(1, 2))
        out = _prefill(q, k, v, is_causal, scale, window)
    else:
        cached_ops.write_cache(k_cache, k.transpose(1, 2), input_pos)
        cached_ops.write_cache(v_cache, v.transpose(1, 2), input_pos)
        keys = k_cache[:b, :kv_len].transpose(1, 2)
        values = v_cache[:b, :kv_len].transpose(1, 2)
        if s_q == 1:
            out = _decode(q, keys, values, input_pos, scale, window)
        else:
            out = _chunk(q, keys, values, input_pos, is_causal, scale, window)
    return from_bnsd(out, layout)


@dumps_graph
def use_fast_attention(gm: GraphModule, decode_kernel_allowed: bool = True) -> int:
    """Make every cached-attention node of ``gm`` call :func:`fast_cached_attention` (in place).

    Works before or after :func:`onboardlm.transforms.backends.use_direct_kernels`; returns the number
    of nodes changed. ``decode_kernel_allowed`` is passed on to every call.
    """
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in op_targets(cached_ops.CACHED_ATTENTION) or node.target is fast_cached_attention:
            node.target = fast_cached_attention
            node.kwargs = {**node.kwargs, "decode_kernel_allowed": decode_kernel_allowed}
            changed += 1
    gm.graph.lint()
    gm.recompile()
    return changed
