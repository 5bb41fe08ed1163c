"""Multi-head latent attention (DeepSeek MLA) on the compressed KV latent, before ``kv_b_proj``.

Shapes follow TensorRT-LLM AutoDeploy's ``torch_mla``: for ``layout="bsnd"`` the queries are
``[B, S, N, d]`` and ``kpe`` is ``[B, S, 1, rope]``; for ``"bnsd"`` they are ``[B, N, S, d]`` and
``[B, 1, S, rope]``. ``compressed_kv`` is ``[B, S, kv_lora_rank]`` in both layouts. The attention
itself is :func:`onboardlm.ops.attention.attend_bnsd` (fp32 softmax, fully masked rows give zeros).
"""

import math

import torch
import torch.nn.functional as F

from onboardlm.ops._library import canonical_op
from onboardlm.ops.attention import attend_bnsd, check_layout, from_bnsd, to_bnsd
from onboardlm.ops.sharding import check_hints


def _shape_error(name: str, x: torch.Tensor, expected: str, layout: str) -> ValueError:
    """Error for a ``[b, n, s, d]`` view ``x``, reporting its shape as the caller passed it."""
    shape = to_bnsd(x, layout).shape if x.dim() == 4 else x.shape  # the transpose is its own inverse
    return ValueError(f"{name} must be {expected}, got shape {list(shape)}")


def _check_mla_args(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    compressed_kv: torch.Tensor,
    kpe: torch.Tensor,
    kv_b_proj_weight: torch.Tensor,
    layout: str,
) -> int:
    """Validate ``[b, n, s, d]`` views of the queries and ``kpe``; return ``v_head_dim``."""
    if q_nope.dim() != 4:
        raise _shape_error("q_nope", q_nope, "4-D", layout)
    b, n_heads, s_q, nope_dim = q_nope.shape
    if q_pe.dim() != 4 or q_pe.shape[:3] != q_nope.shape[:3]:
        raise _shape_error("q_pe", q_pe, "4-D with the batch, heads and sequence of q_nope", layout)
    if compressed_kv.dim() != 3 or compressed_kv.shape[0] != b:
        raise _shape_error("compressed_kv", compressed_kv, f"[B={b}, S, kv_lora_rank]", layout)
    _, s_k, rank = compressed_kv.shape
    if kpe.dim() != 4 or list(kpe.shape) != [b, 1, s_k, q_pe.shape[-1]]:
        raise _shape_error(
            "kpe",
            kpe,
            "[B, S, 1, rope] (bsnd) or [B, 1, S, rope] (bnsd) with compressed_kv's S and q_pe's rope dim",
            layout,
        )
    out_features = kv_b_proj_weight.shape[0]
    if (
        kv_b_proj_weight.dim() != 2
        or kv_b_proj_weight.shape[1] != rank
        or out_features % n_heads
        or out_features // n_heads <= nope_dim
    ):
        raise _shape_error(
            "kv_b_proj_weight", kv_b_proj_weight, f"[{n_heads} * ({nope_dim} + v_head_dim), {rank}]", layout
        )
    return out_features // n_heads - nope_dim


@canonical_op("torch_mla")
def torch_mla(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    compressed_kv: torch.Tensor,
    kpe: torch.Tensor,
    kv_b_proj_weight: torch.Tensor,
    is_causal: bool = True,
    scale: float | None = None,
    layout: str = "bsnd",
    enable_sharding: bool = False,
    layer_type: str = "mla",
) -> torch.Tensor:
    """MLA: expand ``compressed_kv`` with ``kv_b_proj_weight``, then attend; output ``[B, S, N, v_head]``.

    ``kv = compressed_kv @ kv_b_projᵀ`` is split per head into ``k_nope`` and ``v``; the query is
    ``cat(q_nope, q_pe)`` and the key ``cat(k_nope, kpe)`` with ``kpe`` shared by all heads. ``q_pe`` and
    ``kpe`` arrive with RoPE applied. ``scale`` defaults to ``1/sqrt(qk_nope + qk_rope)``; causal masking
    applies only when ``s_q == s_k``. ``enable_sharding`` and ``layer_type`` are sharding hints (the pass
    shards ``kv_b_proj_weight`` by head) and change nothing numerically. Output in ``layout`` order.
    """
    check_layout(layout)
    check_hints(layer_type=layer_type)
    return _mla(q_nope, q_pe, compressed_kv, kpe, kv_b_proj_weight, is_causal, scale, layout, None)


def _mla(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    compressed_kv: torch.Tensor,
    kpe: torch.Tensor,
    kv_b_proj_weight: torch.Tensor,
    is_causal: bool,
    scale: float | None,
    layout: str,
    attn_mask: torch.Tensor | None,
) -> torch.Tensor:
    """The kernel of ``torch_mla`` and ``torch_sparse_mla`` (``attn_mask``: bool, True = allowed)."""
    q_nope, q_pe, kpe = (to_bnsd(x, layout) for x in (q_nope, q_pe, kpe))
    v_head_dim = _check_mla_args(q_nope, q_pe, compressed_kv, kpe, kv_b_proj_weight, layout)
    b, n_heads, _, nope_dim = q_nope.shape
    s_k = compressed_kv.shape[1]
    kv = F.linear(compressed_kv, kv_b_proj_weight).view(b, s_k, n_heads, nope_dim + v_head_dim)
    k_nope, value = kv.transpose(1, 2).split([nope_dim, v_head_dim], dim=-1)
    query = torch.cat([q_nope, q_pe], dim=-1)
    key = torch.cat([k_nope, kpe.expand(b, n_heads, s_k, kpe.shape[-1])], dim=-1)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    out = attend_bnsd(query, key, value, scale, attn_mask=attn_mask, is_causal=is_causal)
    return from_bnsd(out, layout)


@torch_mla.register_fake
def _torch_mla_fake(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    compressed_kv: torch.Tensor,
    kpe: torch.Tensor,
    kv_b_proj_weight: torch.Tensor,
    is_causal: bool = True,
    scale: float | None = None,
    layout: str = "bsnd",
    enable_sharding: bool = False,
    layer_type: str = "mla",
) -> torch.Tensor:
    check_layout(layout)
    check_hints(layer_type=layer_type)
    q_view, pe_view, kpe_view = (to_bnsd(x, layout) for x in (q_nope, q_pe, kpe))
    v_head_dim = _check_mla_args(q_view, pe_view, compressed_kv, kpe_view, kv_b_proj_weight, layout)
    return q_nope.new_empty(*q_nope.shape[:-1], v_head_dim)


def _check_index_mask(
    index_mask: torch.Tensor, q_nope: torch.Tensor, compressed_kv: torch.Tensor, layout: str
) -> None:
    b, _, s_q, _ = to_bnsd(q_nope, layout).shape
    expected = [b, 1, s_q, compressed_kv.shape[1]]
    if index_mask.dtype != torch.bool or list(index_mask.shape) != expected:
        raise ValueError(
            f"index_mask must be bool {expected}, got {index_mask.dtype} {list(index_mask.shape)}"
        )


@canonical_op("torch_sparse_mla")
def torch_sparse_mla(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    compressed_kv: torch.Tensor,
    kpe: torch.Tensor,
    kv_b_proj_weight: torch.Tensor,
    index_mask: torch.Tensor,
    is_causal: bool = True,
    scale: float | None = None,
    layout: str = "bsnd",
    enable_sharding: bool = False,
    layer_type: str = "mla",
) -> torch.Tensor:
    """``torch_mla`` over the keys ``index_mask`` selects (DeepSeek sparse attention).

    ``index_mask`` is bool ``[B, 1, S_q, S_k]``, True = the query may attend to the key (what
    ``torch_lightning_indexer`` returns); it combines with the causal rule. Everything else as ``torch_mla``.
    """
    check_layout(layout)
    check_hints(layer_type=layer_type)
    _check_index_mask(index_mask, q_nope, compressed_kv, layout)
    return _mla(q_nope, q_pe, compressed_kv, kpe, kv_b_proj_weight, is_causal, scale, layout, index_mask)


@torch_sparse_mla.register_fake
def _torch_sparse_mla_fake(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    compressed_kv: torch.Tensor,
    kpe: torch.Tensor,
    kv_b_proj_weight: torch.Tensor,
    index_mask: torch.Tensor,
    is_causal: bool = True,
    scale: float | None = None,
    layout: str = "bsnd",
    enable_sharding: bool = False,
    layer_type: str = "mla",
) -> torch.Tensor:
    return _torch_mla_fake(
        q_nope,
        q_pe,
        compressed_kv,
        kpe,
        kv_b_proj_weight,
        is_causal,
        scale,
        layout,
        enable_sharding,
        layer_type,
    )
