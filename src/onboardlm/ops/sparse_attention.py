"""Sparse-attention selection: DeepSeek's lightning indexer (DSA), as DeepSeek-V3.2 and GLM-MoE-DSA use it.

``torch_lightning_indexer`` scores every key for every query with a few light indexer heads and keeps
the ``index_topk`` best-scoring keys among those the causal rule allows; the attention then attends
only to them (``torch_sparse_mla`` takes the mask it returns).

Decisions where the model code leaves room, each checked against transformers' ``DeepseekV32Indexer``:

- Scores are fp32: ``score[b, s, t] = sum_h w[b, s, h] * relu(scale * q[b, s, h] . k[b, t])`` with the
  same two matmuls as transformers (so equal inputs give equal scores, and ``topk`` breaks ties alike).
- Keys the causal rule excludes score ``-inf`` before the top-k; when fewer than ``index_topk`` keys
  are allowed, all of them are selected (transformers also picks some excluded keys then, which its
  causal mask removes again: the allowed set is the same).
- ``is_causal`` applies only when ``s_q == s_k`` (as in ``torch_attention``).
"""

import math

import torch

from onboardlm.ops._library import canonical_op


def _check_indexer_args(index_q: torch.Tensor, index_k: torch.Tensor, index_weights: torch.Tensor) -> None:
    if index_q.dim() != 4:
        raise ValueError(f"index_q must be [B, S, H, D], got shape {list(index_q.shape)}")
    b, s, h, d = index_q.shape
    if index_k.dim() != 3 or index_k.shape[0] != b or index_k.shape[2] != d:
        raise ValueError(f"index_k must be [B={b}, S_k, D={d}], got shape {list(index_k.shape)}")
    if list(index_weights.shape) != [b, s, h]:
        raise ValueError(
            f"index_weights must be [B={b}, S={s}, H={h}], got shape {list(index_weights.shape)}"
        )


def index_scores(
    index_q: torch.Tensor, index_k: torch.Tensor, index_weights: torch.Tensor, scale: float
) -> torch.Tensor:
    """``[B, S_q, S_k]`` fp32 index scores (module doc): weighted sum over heads of ReLU'd scaled dots."""
    scores = torch.matmul(index_q.float(), index_k.transpose(-1, -2).float().unsqueeze(1)) * scale
    scores = torch.relu(scores)  # [B, S_q, H, S_k]
    return torch.matmul(index_weights.float().unsqueeze(-2), scores).squeeze(-2)


def select_top_keys(scores: torch.Tensor, allowed: torch.Tensor, index_topk: int) -> torch.Tensor:
    """``[B, 1, S_q, S_k]`` bool: True at the ``index_topk`` best ``scores`` ``[B, S_q, S_k]`` among the
    ``allowed`` keys (``allowed`` broadcasts to ``[B, S_q, S_k]``)."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    topk = min(index_topk, scores.shape[-1])
    chosen = scores.topk(topk, dim=-1).indices
    selected = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, chosen, True)
    return (selected & allowed).unsqueeze(1)


@canonical_op("torch_lightning_indexer")
def torch_lightning_indexer(
    index_q: torch.Tensor,
    index_k: torch.Tensor,
    index_weights: torch.Tensor,
    index_topk: int,
    scale: float | None = None,
    is_causal: bool = True,
) -> torch.Tensor:
    """The keys each query attends to under DeepSeek sparse attention: bool ``[B, 1, S_q, S_k]``.

    ``index_q`` ``[B, S_q, H, D]`` (indexer heads, RoPE applied), ``index_k`` ``[B, S_k, D]`` (one key
    shared by the heads, RoPE applied), ``index_weights`` ``[B, S_q, H]`` (per-query head weights, any
    constant factor already folded in). ``scale`` defaults to ``1/sqrt(D)``. True = selected and
    allowed (causal when ``is_causal`` and ``s_q == s_k``); every query keeps at least one key.
    """
    _check_indexer_args(index_q, index_k, index_weights)
    s_q, s_k = index_q.shape[1], index_k.shape[1]
    scale = 1.0 / math.sqrt(index_q.shape[-1]) if scale is None else scale
    scores = index_scores(index_q, index_k, index_weights, scale)
    if is_causal and s_q == s_k:
        allowed = torch.ones(s_q, s_k, dtype=torch.bool, device=scores.device).tril()
    else:
        allowed = torch.ones(1, 1, dtype=torch.bool, device=scores.device)
    return select_top_keys(scores, allowed, index_topk)


@torch_lightning_indexer.register_fake
def _torch_lightning_indexer_fake(
    index_q: torch.Tensor,
    index_k: torch.Tensor,
    index_weights: torch.Tensor,
    index_topk: int,
    scale: float | None = None,
    is_causal: bool = True,
) -> torch.Tensor:
    _check_indexer_args(index_q, index_k, index_weights)
    b, s_q = index_q.shape[:2]
    return index_q.new_empty(b, 1, s_q, index_k.shape[1], dtype=torch.bool)
