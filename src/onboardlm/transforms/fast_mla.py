"""MLA decode on the compressed cache: ``kv_b_proj`` absorbed into the query and the output.

The reference ``onboardlm_cached_mla`` (see :mod:`onboardlm.transforms.cached_ops`) expands the whole
latent cache through ``kv_b_proj`` on every call: a decode step over ``L`` cached tokens costs
``L x rank x n_heads x (nope + v)`` multiply-adds per layer, growing with the context. Since
``k_nope = W_uk c`` and ``v = W_uv c`` for a cached latent ``c``, a query can be moved into the
latent space instead:

- ``q_nope . (W_uk c) = (W_uk^T q_nope) . c``: scores need one ``rank``-wide dot per key;
- ``sum_j p_j W_uv c_j = W_uv (sum_j p_j c_j)``: the values are mixed in latent space and expanded
  once per query.

:func:`fast_cached_mla` does this for one-token steps (the same arguments and cache contract as the
reference, which it calls for everything else). As in the reference, the products run in the input
dtype and the softmax in fp32. The cost per step becomes ``L x rank x n_heads`` (plus the RoPE part). :func:`use_fast_mla` points a graph's
cached MLA nodes at it.
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule

from onboardlm.ops._library import op_targets
from onboardlm.ops.attention import check_layout, from_bnsd, to_bnsd
from onboardlm.transforms import cached_ops
from onboardlm.transforms.dump import dumps_graph


def _reference(*args: object, **kwargs: object) -> torch.Tensor:
    return cached_ops.cached_mla._init_fn(*args, **kwargs)


def fast_cached_mla(
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
    """``onboardlm_cached_mla`` with ``kv_b_proj`` absorbed for one-token steps (module doc)."""
    check_layout(layout)
    q_nope_v, q_pe_v = to_bnsd(q_nope, layout), to_bnsd(q_pe, layout)
    b, n_heads, s_q, nope_dim = q_nope_v.shape
    if s_q != 1 or kv_len == 1:
        return _reference(
            q_nope, q_pe, compressed_kv, kpe, kv_b_proj_weight, ckv_cache, kpe_cache,
            input_pos, kv_len, is_causal, scale, layout, index_mask,
        )  # fmt: skip
    cached_ops.write_cache(ckv_cache, compressed_kv, input_pos)
    cached_ops.write_cache(kpe_cache, to_bnsd(kpe, layout).transpose(1, 2), input_pos)
    rank, dtype = ckv_cache.shape[-1], q_nope.dtype
    weight = kv_b_proj_weight.view(n_heads, -1, rank)
    w_uk, w_uv = weight[:, :nope_dim], weight[:, nope_dim:]  # [n, nope, rank], [n, v, rank]
    latent = ckv_cache[:b, :kv_len]  # [b, L, rank]
    rope_keys = kpe_cache[:b, :kv_len, 0]  # [b, L, rope]
    q_latent = torch.einsum("bnd,ndr->bnr", q_nope_v[:, :, 0], w_uk)
    scores = torch.einsum("bnr,blr->bnl", q_latent, latent).float()
    scores = scores + torch.einsum("bne,ble->bnl", q_pe_v[:, :, 0], rope_keys).float()
    scale = 1.0 / math.sqrt(nope_dim + q_pe_v.shape[-1]) if scale is None else scale
    allowed = torch.arange(kv_len, device=input_pos.device) <= input_pos[:, None]  # [b, L]
    if index_mask is not None:  # the keys a sparse-attention indexer selected, [b, 1, 1, L]
        allowed = allowed & index_mask[:, 0, 0]
    probs = (scores * scale).masked_fill(~allowed[:, None], float("-inf")).softmax(-1).to(dtype)
    context = torch.einsum("bnl,blr->bnr", probs, latent)
    out = torch.einsum("bnr,nvr->bnv", context, w_uv)
    return from_bnsd(out[:, :, None], layout)


@dumps_graph
def use_fast_mla(gm: GraphModule) -> int:
    """Make every cached MLA node of ``gm`` call :func:`fast_cached_mla` (in place); returns the count."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in op_targets(cached_ops.CACHED_MLA):
            node.target = fast_cached_mla
            changed += 1
    gm.graph.lint()
    gm.recompile()
    return changed
