"""Rotary position embedding ops; each returns ``(q_embed, k_embed)`` in the dtypes of ``q`` and ``k``.

Position tables arrive already gathered by position: ``cos``/``sin`` ``[B, S, D]`` (NeoX halves,
``cat(freqs, freqs)``) or complex ``freqs_cis`` ``[B, S, D/2]``. ``unsqueeze_dim`` inserts the head
axis: 1 for ``[B, N, S, D]`` (bnsd) inputs, 2 for ``[B, S, N, D]`` (bsnd).
"""

import torch

from onboardlm.ops._library import canonical_op


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _neox_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos.to(q.dtype).unsqueeze(unsqueeze_dim)
    sin = sin.to(q.dtype).unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


@canonical_op("torch_rope_with_explicit_cos_sin")
def torch_rope_with_explicit_cos_sin(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-interleaved (NeoX/HF) RoPE: ``x * cos + rotate_half(x) * sin``, cos/sin cast to q's dtype."""
    return _neox_rope(q, k, cos, sin, unsqueeze_dim)


@torch_rope_with_explicit_cos_sin.register_fake
def _torch_rope_with_explicit_cos_sin_fake(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k)


def _complex_rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs).flatten(-2).to(x.dtype)


@canonical_op("torch_rope_with_complex_freqs")
def torch_rope_with_complex_freqs(
    xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor, unsqueeze_dim: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved (GPT-J/Meta) RoPE: channel pairs ``(2i, 2i+1)`` times ``freqs_cis[..., i]``, in fp32."""
    freqs = freqs_cis.unsqueeze(unsqueeze_dim)
    return _complex_rotate(xq, freqs), _complex_rotate(xk, freqs)


@torch_rope_with_complex_freqs.register_fake
def _torch_rope_with_complex_freqs_fake(
    xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor, unsqueeze_dim: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(xq), torch.empty_like(xk)


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """``[x0, x1, x2, x3, ...] -> [x0, x2, ..., x1, x3, ...]`` (evens first, then odds)."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).reshape(x.shape)


@canonical_op("torch_rope_with_qk_interleaving")
def torch_rope_with_qk_interleaving(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek RoPE: de-interleave the channels of q and k, then apply NeoX RoPE.

    The output stays in the de-interleaved channel order, as in HF DeepSeek-V3.
    """
    return _neox_rope(_deinterleave(q), _deinterleave(k), cos, sin, unsqueeze_dim)


@torch_rope_with_qk_interleaving.register_fake
def _torch_rope_with_qk_interleaving_fake(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    # de-interleaving copies, so the result is contiguous whatever the input strides
    return q.new_empty(q.shape), k.new_empty(k.shape)
