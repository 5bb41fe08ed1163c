"""Attention with a learned bias per key (Doge's dynamic mask attention).

``torch_attention_key_bias`` is ``torch_attention`` (causal, GQA/MQA) whose scores get a bias that
depends only on the key: ``scores[b, h, i, j] = scale * q[b, h, i] . k[b, g(h), j] + key_bias[b, g(h), j]``
with ``g(h)`` the key/value head of query head ``h``. The bias is computed by the model from the keys'
own tokens (Doge: ``exp(A * softplus(dt_proj(values)))``), so a KV cache keeps it beside K and V.

``keep_window``: where a query row has more than ``keep_window`` keys (``s_k > keep_window``), it keeps
only the ``keep_window`` keys of the highest bias among those the causal rule allows (Doge's
``keep_window_size``: transformers' ``topk`` over the masked bias row, per key/value head); None or
``<= 0`` keeps every allowed key. Ties at the threshold keep every tied key (transformers' ``topk``
picks among them arbitrarily). ``is_causal`` applies only when ``s_q == s_k`` (as in
``torch_attention``). Softmax in fp32; rows with no allowed key give zeros.
"""

from __future__ import annotations

import math

import torch

from onboardlm.ops._library import canonical_op
from onboardlm.ops.attention import (
    _check_qkv,
    _grouped_scores,
    _grouped_values,
    _safe_softmax,
    _structural_allowed,
    check_layout,
    from_bnsd,
    to_bnsd,
)


def _check_key_bias(query: torch.Tensor, key: torch.Tensor, key_bias: torch.Tensor) -> None:
    _check_qkv(query, key, key)
    b, n_kv, s_k = key.shape[:3]
    if list(key_bias.shape) != [b, n_kv, s_k] or not key_bias.is_floating_point():
        raise ValueError(
            f"key_bias must be a float [b, n_kv, s_k] = {[b, n_kv, s_k]}, got {key_bias.dtype}"
            f" of shape {list(key_bias.shape)}"
        )


def kept_keys(
    key_bias: torch.Tensor, allowed: torch.Tensor | None, s_q: int, keep_window: int | None
) -> torch.Tensor | None:
    """``[b, n_kv, s_q, s_k]`` bool: the allowed keys each query row keeps under ``keep_window`` (the
    highest ``key_bias`` ``[b, n_kv, s_k]``); None where every allowed key stays."""
    s_k = key_bias.shape[-1]
    if keep_window is None or keep_window <= 0 or s_k <= keep_window:
        return None
    rows = key_bias.float()[:, :, None, :].expand(-1, -1, s_q, -1)
    if allowed is not None:
        rows = rows.masked_fill(~allowed, float("-inf"))
    threshold = rows.topk(keep_window, dim=-1).values[..., -1:]
    kept = rows >= threshold
    return kept if allowed is None else kept & allowed


def attend_key_bias_bnsd(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_bias: torch.Tensor,
    scale: float,
    allowed: torch.Tensor | None,
    keep_window: int | None,
) -> torch.Tensor:
    """The op on validated ``[b, n, s, d]`` inputs; ``allowed``: bool, broadcast to ``[b, n_kv, s_q,
    s_k]`` (True = the key may be attended to), None for every key."""
    n_heads, s_q = query.shape[1], query.shape[2]
    if allowed is not None and allowed.dim() == 2:  # [s_q, s_k]: the same for every sequence and head
        allowed = allowed[None, None]
    groups = n_heads // key.shape[1]
    scores = _grouped_scores(query, key).float() * scale
    scores = scores + key_bias.float().repeat_interleave(groups, dim=1)[:, :, None, :]
    kept = kept_keys(key_bias, allowed, s_q, keep_window)
    if kept is not None:
        allowed = kept
    if allowed is not None:  # per key/value head: the same keys for every query head of its group
        allowed = allowed.repeat_interleave(groups, dim=1) if allowed.shape[1] > 1 else allowed
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = _safe_softmax(scores, None).to(query.dtype)
    return _grouped_values(probs, value)


@canonical_op("torch_attention_key_bias")
def torch_attention_key_bias(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_bias: torch.Tensor,
    keep_window: int | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    layout: str = "bnsd",
) -> torch.Tensor:
    """Attention whose scores get a bias per key/value head and key (module doc), ``key_bias``
    ``[b, n_kv, s_k]``; ``layout`` of q/k/v ``"bnsd"`` or ``"bsnd"``, the output ``[.., d_v]`` in it;
    ``scale`` defaults to ``1/sqrt(d)``."""
    check_layout(layout)
    q, k, v = (to_bnsd(x, layout) for x in (query, key, value))
    _check_qkv(q, k, v)
    _check_key_bias(q, k, key_bias)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    allowed = _structural_allowed(q.shape[2], k.shape[2], is_causal, None, q.device)
    return from_bnsd(attend_key_bias_bnsd(q, k, v, key_bias, scale, allowed, keep_window), layout)


@torch_attention_key_bias.register_fake
def _torch_attention_key_bias_fake(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_bias: torch.Tensor,
    keep_window: int | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    layout: str = "bnsd",
) -> torch.Tensor:
    check_layout(layout)
    q, k, v = (to_bnsd(x, layout) for x in (query, key, value))
    _check_qkv(q, k, v)
    _check_key_bias(q, k, key_bias)
    return query.new_empty(*query.shape[:-1], value.shape[-1])
