"""Attention ops: the unified reference attention, an SDPA wrapper and ``repeat_kv``.

``torch_attention`` is the op model files call; :func:`attend_bnsd` is its kernel, shared with MLA.

Decisions where the contract (OPS.md) leaves room, each checked against TensorRT-LLM AutoDeploy's
``torch_attention`` and HF eager attention:

- ``logit_cap`` caps the scaled scores, then the masks are applied, so masked keys stay excluded.
  For bool, causal and window masks this is exactly "cap after masks"; for a finite additive mask it is
  HF Gemma2's order (cap, then add). AutoDeploy adds ``-inf`` first and caps after, which turns a masked
  ``-inf`` into ``-cap`` and lets masked keys through; we do not copy that.
- A bool mask is ``True = allowed`` (``False`` becomes ``-inf``); a float mask is added as it is, so HF's
  ``finfo.min`` masks give exactly what HF eager gives.
- Sliding window: key ``k`` is allowed for query ``i`` iff ``0 <= q_pos(i) - k < sliding_window`` with
  ``q_pos(i) = i`` when ``s_q == s_k`` and ``s_k + i`` otherwise (OPS.md rule 6 and AutoDeploy: the keys
  are read as the tokens *before* the queries). A caller whose keys include the current tokens and
  whose ``s_q != s_k`` passes an explicit ``attn_mask`` instead. ``None`` or ``<= 0`` disables it, as
  ``logit_cap`` ``None`` or ``<= 0`` does.
- Sinks: one logit per head joins the softmax denominator (max taken over scores and sink, as HF
  GPT-OSS does), contributing no value.
- A query row whose keys are all excluded (``-inf``/``False``/causal/window) gives zeros, not NaN: the
  convention of ``F.scaled_dot_product_attention`` (torch >= 2.5) and the limit of a sink row.
  HF eager would give NaN for such a row, but HF only ever passes finite masks, which we match.
- Scores and ``probs @ V`` are matmuls in the input dtype (as HF eager and AutoDeploy); scaling,
  capping, masking and the softmax run in fp32, and the probabilities are cast to the query dtype.
"""

import math

import torch
import torch.nn.functional as F

from onboardlm.ops._library import canonical_op

#: Accepted values of ``layout``.
LAYOUTS: tuple[str, ...] = ("bnsd", "bsnd")


def check_layout(layout: str) -> None:
    """Raise ValueError unless ``layout`` is ``"bnsd"`` or ``"bsnd"``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def to_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View of ``x`` in ``[b, n, s, d]`` order (a transpose for ``bsnd``, no copy)."""
    return x if layout == "bnsd" else x.transpose(1, 2)


def from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Contiguous ``x`` in ``layout`` order, from ``[b, n, s, d]``."""
    return x.contiguous() if layout == "bnsd" else x.transpose(1, 2).contiguous()


def _check_rank(name: str, x: torch.Tensor, rank: int) -> None:
    if x.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D, got shape {list(x.shape)}")


def _check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Shape checks on ``[b, n, s, d]`` views of query, key and value."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        _check_rank(name, x, 4)
    b, n_heads, _, head_dim = query.shape
    n_kv = key.shape[1]
    if key.shape[0] != b or key.shape[-1] != head_dim:
        raise ValueError(
            f"key must match query in batch ({b}) and head dim ({head_dim}), got shape {list(key.shape)}"
        )
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"key has {n_kv} heads, which does not divide the {n_heads} query heads")
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(
            f"value must match key in batch, heads and sequence {list(key.shape[:3])}, "
            f"got shape {list(value.shape)}"
        )


def _check_mask(attn_mask: torch.Tensor, expected: tuple[int, ...]) -> None:
    """A 4-D mask whose every dim equals the expected one or is 1 (broadcast)."""
    if attn_mask.dim() != 4 or any(m != 1 and m != e for m, e in zip(attn_mask.shape, expected, strict=True)):
        raise ValueError(
            f"attn_mask must be [b, n, s_q, s_k] = {list(expected)} or broadcastable (dims of 1), "
            f"got shape {list(attn_mask.shape)}"
        )
    if not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        raise ValueError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")


def _check_attention_args(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    sinks: torch.Tensor | None,
) -> None:
    """Validate ``[b, n, s, d]`` views of the ``torch_attention`` arguments."""
    _check_qkv(query, key, value)
    b, n_heads, s_q, _ = query.shape
    if attn_mask is not None:
        _check_mask(attn_mask, (b, n_heads, s_q, key.shape[2]))
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if sinks is not None and sinks.numel() != n_heads:
        raise ValueError(
            f"sinks must hold one logit per query head ({n_heads}), got shape {list(sinks.shape)}"
        )


def _grouped_scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``Q·Kᵀ`` ``[b, n, s_q, s_k]``; query head ``h`` reads key head ``h // (n / n_kv)``, without copying K."""
    b, n_heads, s_q, head_dim = query.shape
    n_kv, s_k = key.shape[1], key.shape[2]
    grouped = query.reshape(b, n_kv, (n_heads // n_kv) * s_q, head_dim)
    return torch.matmul(grouped, key.transpose(-2, -1)).reshape(b, n_heads, s_q, s_k)


def _grouped_values(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``P·V`` ``[b, n, s_q, d_v]`` with the same head grouping as :func:`_grouped_scores`."""
    b, n_heads, s_q, s_k = probs.shape
    n_kv = value.shape[1]
    out = torch.matmul(probs.reshape(b, n_kv, (n_heads // n_kv) * s_q, s_k), value)
    return out.reshape(b, n_heads, s_q, value.shape[-1])


def _structural_allowed(
    s_q: int,
    s_k: int,
    is_causal: bool,
    sliding_window: int | None,
    device: torch.device,
    attention_chunk_size: int | None = None,
) -> torch.Tensor | None:
    """``[s_q, s_k]`` bool, True where the causal, window and chunk rules allow the key; None if no
    rule applies."""
    causal = is_causal and s_q == s_k
    windowed = sliding_window is not None and sliding_window > 0
    chunked = attention_chunk_size is not None and attention_chunk_size > 0
    if not (causal or windowed or chunked):
        return None
    offset = 0 if s_q == s_k else s_k
    q_pos = torch.arange(offset, offset + s_q, device=device).unsqueeze(-1)
    distance = q_pos - torch.arange(s_k, device=device)
    allowed = torch.ones(s_q, s_k, dtype=torch.bool, device=device)
    if causal:
        allowed &= distance >= 0
    if windowed:
        allowed &= (distance >= 0) & (distance < sliding_window)
    if chunked:  # chunked local attention (Llama 4): keys of the query's own chunk of positions only
        allowed &= q_pos // attention_chunk_size == torch.arange(s_k, device=device) // attention_chunk_size
    return allowed


def _safe_softmax(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """fp32 softmax over the last dim with optional per-head sink logits in the denominator.

    Rows with no finite score (and no sink) give zeros instead of NaN.
    """
    peak = scores.amax(dim=-1, keepdim=True)
    sink = None if sinks is None else sinks.float().reshape(1, -1, 1, 1)
    if sink is not None:
        peak = torch.maximum(peak, sink)
    peak = peak.masked_fill(peak == float("-inf"), 0.0)
    weights = torch.exp(scores - peak)
    denominator = weights.sum(dim=-1, keepdim=True)
    if sink is not None:
        denominator = denominator + torch.exp(sink - peak)
    return weights / denominator.masked_fill(denominator == 0, 1.0)


def attend_bnsd(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    attention_chunk_size: int | None = None,
) -> torch.Tensor:
    """Attention on validated ``[b, n, s, d]`` inputs (K/V may have fewer heads); returns ``[b, n, s_q, d_v]``.

    The semantics are those of the module docstring; this is the kernel behind ``torch_attention``
    and ``torch_mla``.
    """
    s_q, s_k = query.shape[2], key.shape[2]
    scores = _grouped_scores(query, key).float() * scale
    if logit_cap is not None and logit_cap > 0:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    allowed = _structural_allowed(s_q, s_k, is_causal, sliding_window, query.device, attention_chunk_size)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = _safe_softmax(scores, sinks).to(query.dtype)
    return _grouped_values(probs, value)


@canonical_op("torch_attention")
def torch_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    layout: str = "bnsd",
    attention_chunk_size: int | None = None,
) -> torch.Tensor:
    """Reference attention with GQA/MQA, masks, causal, sliding window, logit cap and sinks.

    ``attention_chunk_size > 0``: chunked local attention (Llama 4), key ``k`` allowed for the query at
    position ``p`` only when ``p // attention_chunk_size == k // attention_chunk_size`` (an extension of
    the AutoDeploy signature, after ``layout``; None or ``<= 0`` disables it).

    ``layout`` ``"bnsd"`` (``[b, n, s, d]``) or ``"bsnd"``; the output ``[.., d_v]`` comes back in it.
    ``attn_mask`` is always ``[b, n, s_q, s_k]`` (dims of 1 broadcast); ``scale`` defaults to
    ``1/sqrt(d)`` of the query; dropout is a no-op. See the module docstring for the exact rules.
    """
    check_layout(layout)
    q, k, v = (to_bnsd(x, layout) for x in (query, key, value))
    _check_attention_args(q, k, v, attn_mask, dropout_p, sinks)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = attend_bnsd(
        q, k, v, scale, attn_mask, is_causal, sinks, sliding_window, logit_cap, attention_chunk_size
    )
    return from_bnsd(out, layout)


@torch_attention.register_fake
def _torch_attention_fake(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    layout: str = "bnsd",
    attention_chunk_size: int | None = None,
) -> torch.Tensor:
    check_layout(layout)
    _check_attention_args(*(to_bnsd(x, layout) for x in (query, key, value)), attn_mask, dropout_p, sinks)
    return query.new_empty(*query.shape[:-1], value.shape[-1])


@canonical_op("torch_attention_sdpa")
def torch_attention_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on contiguous ``[b, n, s, d]`` inputs; contiguous output."""
    out = F.scaled_dot_product_attention(
        query.contiguous(),
        key.contiguous(),
        value.contiguous(),
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )
    return out.contiguous()


@torch_attention_sdpa.register_fake
def _torch_attention_sdpa_fake(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    return query.new_empty(*query.shape[:-1], value.shape[-1])


def _check_repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> None:
    _check_rank("hidden_states", hidden_states, 4)
    if n_rep < 1:
        raise ValueError(f"n_rep must be >= 1, got {n_rep}")


@canonical_op("torch_attention_repeat_kv")
def torch_attention_repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[b, n_kv, s, d] -> [b, n_kv * n_rep, s, d]``, each KV head repeated ``n_rep`` times consecutively (a copy)."""
    _check_repeat_kv(hidden_states, n_rep)
    return torch.repeat_interleave(hidden_states, n_rep, dim=1)


@torch_attention_repeat_kv.register_fake
def _torch_attention_repeat_kv_fake(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    _check_repeat_kv(hidden_states, n_rep)
    b, n_kv, s, d = hidden_states.shape
    return hidden_states.new_empty(b, n_kv * n_rep, s, d)
