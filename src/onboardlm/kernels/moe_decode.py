"""Routed experts for a few tokens in two Triton launches, reading each selected expert in place.

At decode, ``T * top_k`` (token, expert) pairs each need one expert's gate/up/down rows. Indexing the
stacked expert weights (``w1[ids]``) first copies the selected experts (a read and a write of every
byte) before the batched products read them again, and the MLP takes about ten launches. Here:

1. ``_gate_up_kernel``: one program per (pair, ``BLOCK_I`` rows of the expert's intermediate) streams
   those rows of ``w1`` and ``w3`` straight from the stacked tensor (any expert stride: a view of a
   fused checkpoint tensor works) and writes ``silu(gate) * up`` in fp32;
2. ``_down_kernel``: one program per (pair, ``BLOCK_N`` output channels) streams the expert's ``w2``
   rows and writes the pair's output times its routing weight (fp32, ``[T * top_k, H]``); the caller
   sums the ``top_k`` rows of each token.

Measured on an H200 (``benchmarks/gpu.py``, Qwen3-MoE shape: 128 experts, 8 active, hidden 2048; run 6 in
``benchmarks/results/gpu_nvidia_h200_run6.md``): decode at batch 1 1011 tok/s against 725 for the gathered
path in the same run (1.39x), at batch 8 4097 against 1771 (2.31x).

Accumulation is fp32 throughout (the reference op rounds the gate, up and down products to the
weight dtype; the difference is that rounding). Triton is optional: :func:`is_available` says
whether a call can run here (a CUDA tensor and Triton, or ``TRITON_INTERPRET=1`` on the CPU, which
is how the tests run it without a GPU).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch do not bring Triton
    triton = None

#: Weight dtypes the kernels take.
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_available(hidden: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether :func:`moe_decode` can run on ``hidden`` ``[T, H]`` and the stacked ``weights`` here."""
    if triton is None or any(w.dtype not in DTYPES or w.stride(-1) != 1 for w in weights):
        return False
    return hidden.is_cuda or _interpret()


def moe_decode(
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
) -> torch.Tensor:
    """``sum_j weights[t, j] * expert_{ids[t, j]}(hidden[t])`` as fp32 ``[T, H]`` (SiLU-gated experts).

    ``hidden`` ``[T, H]``; ``ids`` ``[T, k]`` valid expert indices; ``weights`` ``[T, k]`` fp32;
    ``w1``/``w3`` ``[E, I, H]``, ``w2`` ``[E, H, I]`` with unit stride on their last dim.
    """
    tokens, top_k = ids.shape
    inter, size = w1.shape[1], w1.shape[2]
    pairs = tokens * top_k
    flat_ids = ids.reshape(-1).contiguous()
    flat_weights = weights.reshape(-1).float().contiguous()
    x = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    inner = torch.empty(pairs, inter, dtype=torch.float32, device=hidden.device)
    out = torch.empty(pairs, size, dtype=torch.float32, device=hidden.device)
    gate_up = (x, flat_ids, w1, w3, inner, size, inter, top_k, x.stride(0))
    gate_up += (w1.stride(0), w1.stride(1), w3.stride(0), w3.stride(1))
    down = (inner, flat_ids, flat_weights, w2, out, size, inter, w2.stride(0), w2.stride(1))
    if _interpret():  # the autotuner needs a GPU driver
        _gate_up_kernel.fn[(pairs, triton.cdiv(inter, 16))](*gate_up, BLOCK_I=16, BLOCK_H=64)
        _down_kernel.fn[(pairs, triton.cdiv(size, 16))](*down, BLOCK_N=16, BLOCK_I=64)
    else:
        _gate_up_kernel[lambda m: (pairs, triton.cdiv(inter, m["BLOCK_I"]))](*gate_up)
        _down_kernel[lambda m: (pairs, triton.cdiv(size, m["BLOCK_N"]))](*down)
    return out.view(tokens, top_k, size).sum(dim=1)


if triton is not None:
    #: (rows, columns per tile, warps, stages) tried by the autotuners.
    _TILES = (
        (8, 256, 4, 3),
        (16, 128, 4, 3),
        (16, 256, 4, 3),
        (16, 256, 8, 3),
        (32, 128, 4, 3),
        (32, 256, 8, 2),
    )

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_I": r, "BLOCK_H": c}, num_warps=w, num_stages=s) for r, c, w, s in _TILES
        ],
        key=["HIDDEN", "INTER"],
    )
    @triton.jit
    def _gate_up_kernel(
        x_ptr, ids_ptr, w1_ptr, w3_ptr, inner_ptr, HIDDEN, INTER, TOP_K, stride_x,
        stride_1e, stride_1i, stride_3e, stride_3i,
        BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
    ):  # fmt: skip
        pair = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        row_ok = rows < INTER
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        x_row = x_ptr + (pair // TOP_K) * stride_x
        w1_rows = w1_ptr + expert * stride_1e + rows[:, None].to(tl.int64) * stride_1i
        w3_rows = w3_ptr + expert * stride_3e + rows[:, None].to(tl.int64) * stride_3i
        gate = tl.zeros([BLOCK_I, BLOCK_H], dtype=tl.float32)
        up = tl.zeros([BLOCK_I, BLOCK_H], dtype=tl.float32)
        for h0 in range(0, HIDDEN, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            col_ok = cols < HIDDEN
            x = tl.load(x_row + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            mask = row_ok[:, None] & col_ok[None, :]
            gate += tl.load(w1_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * x
            up += tl.load(w3_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * x
        g = tl.sum(gate, axis=1)
        tl.store(inner_ptr + pair * INTER + rows, g * tl.sigmoid(g) * tl.sum(up, axis=1), mask=row_ok)

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": r, "BLOCK_I": c}, num_warps=w, num_stages=s) for r, c, w, s in _TILES
        ],
        key=["HIDDEN", "INTER"],
    )
    @triton.jit
    def _down_kernel(
        inner_ptr, ids_ptr, weights_ptr, w2_ptr, out_ptr, HIDDEN, INTER, stride_2e, stride_2h,
        BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr,
    ):  # fmt: skip
        pair = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < HIDDEN
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        w2_rows = w2_ptr + expert * stride_2e + rows[:, None].to(tl.int64) * stride_2h
        acc = tl.zeros([BLOCK_N, BLOCK_I], dtype=tl.float32)
        for i0 in range(0, INTER, BLOCK_I):
            cols = i0 + tl.arange(0, BLOCK_I)
            col_ok = cols < INTER
            a = tl.load(inner_ptr + pair * INTER + cols, mask=col_ok, other=0.0)[None, :]
            w = tl.load(w2_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * a
        result = tl.sum(acc, axis=1) * tl.load(weights_ptr + pair)
        tl.store(out_ptr + pair * HIDDEN + rows, result, mask=row_ok)
