"""The cached form of ``torch_attention_key_bias`` (Doge's dynamic mask attention).

The bias of a key comes from that key's own token, so the cache keeps it beside the key and the value:
``bias_cache`` ``[max_batch, max_seq, n_kv]``, written at ``input_pos`` like ``k_cache``/``v_cache``
(see :mod:`onboardlm.transforms.cached_ops` for the cache layout and the causal rule over absolute
positions). ``keep_window`` then keeps, per query, the highest-bias keys among the allowed cached
ones, as the uncached op does over the whole sequence.
"""

from __future__ import annotations

import math

import torch

from onboardlm.ops.attention import check_layout, from_bnsd, to_bnsd
from onboardlm.ops.key_bias_attention import attend_key_bias_bnsd
from onboardlm.transforms.cached_ops import NAMESPACE, _check_cache, allowed_keys, write_cache

CACHED_KEY_BIAS_ATTENTION = "onboardlm_cached_attention_key_bias"


@torch.library.custom_op(
    f"{NAMESPACE}::{CACHED_KEY_BIAS_ATTENTION}", mutates_args=("k_cache", "v_cache", "bias_cache")
)
def cached_attention_key_bias(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_bias: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    bias_cache: torch.Tensor,
    input_pos: torch.Tensor,
    kv_len: int,
    keep_window: int | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    layout: str = "bnsd",
) -> torch.Tensor:
    """``torch_attention_key_bias`` over a cache: write keys, values and ``key_bias`` ``[b, n_kv, s]``
    at ``input_pos``, attend over the first ``kv_len`` cached positions."""
    check_layout(layout)
    q, k, v = (to_bnsd(x, layout) for x in (query, key, value))
    b, _, s_q, head_dim = q.shape
    _check_cache("k_cache", k_cache, b, kv_len)
    write_cache(k_cache, k.transpose(1, 2), input_pos)
    write_cache(v_cache, v.transpose(1, 2), input_pos)
    write_cache(bias_cache, key_bias.transpose(1, 2), input_pos)
    keys = k_cache[:b, :kv_len].transpose(1, 2)
    values = v_cache[:b, :kv_len].transpose(1, 2)
    biases = bias_cache[:b, :kv_len].transpose(1, 2)
    allowed = allowed_keys(input_pos, s_q, kv_len, is_causal, None)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    return from_bnsd(attend_key_bias_bnsd(q, keys, values, biases, scale, allowed, keep_window), layout)


@cached_attention_key_bias.register_fake
def _cached_attention_key_bias_fake(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_bias: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    bias_cache: torch.Tensor,
    input_pos: torch.Tensor,
    kv_len: int,
    keep_window: int | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    layout: str = "bnsd",
) -> torch.Tensor:
    check_layout(layout)
    return query.new_empty(*query.shape[:-1], value.shape[-1])
