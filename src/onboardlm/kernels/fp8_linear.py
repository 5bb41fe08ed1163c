"""FP8 linear kernels for ``auto_deploy::torch_quant_fp8_linear`` (numbers of the reference op).

* ``_quant_kernel`` (Triton): quantises the activation in one launch, one program per (token, group):
  per token (group = the whole row), per token and ``bk`` channels (block-scaled weights), or with a
  static per-tensor scale.
* Per-tensor / per-channel weights: a token count up to :data:`GEMV_MAX_TOKENS` (batch-1 decode) runs
  ``_gemv_kernel`` (Triton: each program streams ``BLOCK_N`` FP8 weight rows once and applies both
  scales at the end); larger ones run ``torch._scaled_mm`` with row-wise scales (cuBLASLt/CUTLASS FP8
  GEMM, fp32 accumulation, bf16 out).
* Block-scaled weights (``[ceil(N/bn), ceil(K/bk)]``): ``_block_gemm_kernel`` (Triton, ``tl.dot`` on FP8
  tiles of ``bk`` channels, each partial product scaled by its activation and weight block scales).

Measured on an H200 (``benchmarks/fp8_probe.py``, ``benchmarks/results/fp8_h200_probe.json``; the linears of
32 Llama-3-8B layers): one token 2.68 ms against bf16 cuBLAS 3.75 ms (1.40x; the GEMV streams FP8 at
2.6 TB/s where cuBLAS streams bf16 at 3.7 TB/s), ``_scaled_mm`` at one token 0.87x (hence the GEMV);
2048 tokens 26.9 ms against 42.5 ms (1.58x; 1.72x with :data:`FAST_ACCUM`, whose accuracy was not
measured). The block-scaled Triton kernels are slower than bf16 (0.77x decode, 0.79x prefill).

Triton is optional (CPU builds of torch lack it): :func:`is_available` says whether a call can run here
(a CUDA bf16 activation, an FP8 weight with dims that ``_scaled_mm`` takes); the op falls back to the
reference otherwise. ``TRITON_INTERPRET=1`` runs the Triton kernels on the CPU (tests).
"""

from __future__ import annotations

import os

import torch

from onboardlm.ops.quantization import FP8_DTYPE, FP8_MAX, MIN_SCALE, weight_scheme

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch do not bring Triton
    triton = None

#: Token counts up to this run the Triton GEMV (weights streamed once per token); more run a GEMM.
GEMV_MAX_TOKENS = 1
#: Whether ``torch._scaled_mm`` may use Hopper's fast (lower-precision) FP8 accumulation.
FAST_ACCUM = False


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_available(input: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether :func:`fp8_linear` can compute this call on its device."""
    if weight.dtype != FP8_DTYPE or weight.dim() != 2 or input.dtype != torch.bfloat16:
        return False
    n, k = weight.shape
    if n % 16 or k % 16 or not weight.is_contiguous():
        return False
    try:
        kind, block = weight_scheme(weight, scale)
    except ValueError:
        return False
    if kind == "block" and (triton is None or block is None or block[1] < 16):
        return False
    if input.is_cuda:
        return True
    return _interpret() and triton is not None


def quantize_input(
    x2: torch.Tensor, static: torch.Tensor | None, group: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8 [M, K], scale fp32 [M, 1] or [M, ceil(K / group)])`` for a 2-D bf16 ``x2``."""
    m, k = x2.shape
    if triton is None or not (x2.is_cuda or _interpret()):
        from onboardlm.ops.quantization import quantize_activation

        quantized, scale = quantize_activation(x2, static, group)
        return quantized, scale.expand(m, 1) if scale.dim() == 0 else scale
    width = k if group is None else group
    groups = -(-k // width)
    quantized = torch.empty((m, k), dtype=FP8_DTYPE, device=x2.device)
    scale = torch.empty((m, groups), dtype=torch.float32, device=x2.device)
    static_ptr = static.float().reshape(1) if static is not None else scale
    _quant_kernel[(m, groups)](
        x2, quantized, scale, static_ptr, k, x2.stride(0), width, groups,
        STATIC=static is not None, BLOCK=triton.next_power_of_2(width), FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE,
    )  # fmt: skip
    return quantized, scale


def fp8_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    static: torch.Tensor | None,
    scale: torch.Tensor,
) -> torch.Tensor:
    """The reference op's result for a call :func:`is_available` accepts (module doc)."""
    n, k = weight.shape
    x2 = input.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    kind, block = weight_scheme(weight, scale)
    if m <= GEMV_MAX_TOKENS and triton is not None and (block is None or block[1] <= 256):
        out = _gemv(x2, weight, scale, static, block, bias)
    elif kind == "block":
        assert block is not None
        if static is not None:  # block weights with a static activation scale: one group per row
            xq, xs = quantize_input(x2, static, None)
            xs = xs.expand(m, -(-k // block[1])).contiguous()
        else:
            xq, xs = quantize_input(x2, None, block[1])
        out = _block_gemm(xq, xs, weight, scale.float().contiguous(), block, bias)
    else:
        xq, xs = quantize_input(x2, static, None)
        out = torch._scaled_mm(
            xq, weight.t(), scale_a=xs, scale_b=_channel_scale(scale, n), bias=None,
            out_dtype=torch.bfloat16, use_fast_accum=FAST_ACCUM,
        )  # fmt: skip
        if bias is not None:
            out = out + bias.to(out.dtype)
    return out.reshape(*input.shape[:-1], n)


def _channel_scale(scale: torch.Tensor, n: int) -> torch.Tensor:
    """A per-tensor or per-channel weight scale as the ``[1, N]`` fp32 row ``_scaled_mm`` takes."""
    ws = scale.float().reshape(1, -1)
    return (ws.expand(1, n) if ws.shape[1] != n else ws).contiguous()


def _gemv(
    x2: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    static: torch.Tensor | None,
    block: tuple[int, int] | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """One launch per call: each program quantises the activation row itself and streams ``BLOCK_N`` rows."""
    m, k = x2.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=torch.bfloat16, device=x2.device)
    ws = scale.float().contiguous() if block is not None else _channel_scale(scale, n)
    static_t = static.float().reshape(1) if static is not None else ws
    bn, bk = block if block is not None else (1, 1)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), m)

    args = (
        x2,
        weight,
        ws,
        bias if bias is not None else out,
        out,
        static_t,
        n,
        k,
        x2.stride(0),
        weight.stride(0),
    )
    flags = {
        "SCALE_BN": bn, "SCALE_STRIDE": ws.stride(0), "GROUP_K": bk, "HAS_BIAS": bias is not None,
        "STATIC": static is not None, "BLOCK_SCALED": block is not None, "FP8_MAX": FP8_MAX, "MIN_SCALE": MIN_SCALE,
    }  # fmt: skip
    if _interpret():  # the autotuner needs a GPU driver
        _gemv_kernel.fn[grid](*args, **flags, BLOCK_N=16, BLOCK_K=256)
    else:
        _gemv_kernel[grid](*args, **flags)
    return out


def _block_gemm(
    xq: torch.Tensor,
    xs: torch.Tensor,
    weight: torch.Tensor,
    ws: torch.Tensor,
    block: tuple[int, int],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    m, k = xq.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=torch.bfloat16, device=xq.device)
    bias_ptr = bias if bias is not None else out
    bucket = min(triton.next_power_of_2(m), 512)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    args = (
        xq,
        xs,
        weight,
        ws,
        bias_ptr,
        out,
        m,
        n,
        k,
        xq.stride(0),
        xs.stride(0),
        weight.stride(0),
        ws.stride(0),
    )
    args += (out.stride(0), block[0], bucket)
    if _interpret():  # the autotuner needs a GPU driver
        _block_gemm_kernel.fn[grid](
            *args, HAS_BIAS=bias is not None, BLOCK_K=block[1], BLOCK_M=16, BLOCK_N=64
        )
    else:
        _block_gemm_kernel[grid](*args, HAS_BIAS=bias is not None, BLOCK_K=block[1])
    return out


if triton is not None:

    @triton.jit
    def _quant_kernel(
        x_ptr, q_ptr, s_ptr, static_ptr, K, stride_x, WIDTH, GROUPS,
        STATIC: tl.constexpr, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        grp = tl.program_id(1)
        cols = grp * WIDTH + tl.arange(0, BLOCK)
        mask = (tl.arange(0, BLOCK) < WIDTH) & (cols < K)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if STATIC:  # noqa: SIM108  (a constexpr branch: only one side is compiled)
            scale = tl.load(static_ptr)
        else:
            scale = tl.maximum(tl.max(tl.abs(x), axis=0) / FP8_MAX, MIN_SCALE)
        q = tl.clamp(x / scale, -FP8_MAX, FP8_MAX)
        tl.store(q_ptr + row * K + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + row * GROUPS + grp, scale)

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in (
                (8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 4, 3), (16, 512, 8, 3), (32, 256, 8, 3),
                (8, 1024, 8, 2), (32, 512, 8, 2), (64, 256, 8, 2),
            )
        ],
        key=["N", "K", "BLOCK_SCALED", "STATIC"],
    )  # fmt: skip
    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, static_ptr, N, K, stride_x, stride_w,
        SCALE_BN: tl.constexpr, SCALE_STRIDE: tl.constexpr, GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr,
        STATIC: tl.constexpr, BLOCK_SCALED: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        row = tl.program_id(1)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        x_row = x_ptr + row * stride_x
        # the activation's scale: static, per token (a pass over the row, from L2), or per group below
        if STATIC:
            xs = tl.load(static_ptr)
        elif not BLOCK_SCALED:
            amax = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            xs = tl.maximum(tl.max(amax, axis=0) / FP8_MAX, MIN_SCALE)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            if BLOCK_SCALED and not STATIC:
                xg = tl.reshape(x, (BLOCK_K // GROUP_K, GROUP_K))
                gs = tl.maximum(tl.max(tl.abs(xg), axis=1) / FP8_MAX, MIN_SCALE)
                qg = tl.clamp(xg / gs[:, None], -FP8_MAX, FP8_MAX).to(tl.float8e4nv).to(tl.float32)
                xq = tl.reshape(qg * gs[:, None], (BLOCK_K,))
            elif BLOCK_SCALED:
                xq = tl.clamp(x / xs, -FP8_MAX, FP8_MAX).to(tl.float8e4nv).to(tl.float32) * xs
            else:
                xq = tl.clamp(x / xs, -FP8_MAX, FP8_MAX).to(tl.float8e4nv).to(tl.float32)
            w = tl.load(
                w_ptr + offs_n[:, None] * stride_w + offs_k[None, :],
                mask=n_mask[:, None] & k_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            if BLOCK_SCALED:
                w_scale = tl.load(
                    ws_ptr + (offs_n // SCALE_BN)[:, None] * SCALE_STRIDE + (offs_k // GROUP_K)[None, :],
                    mask=n_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                w = w * w_scale
            acc += w * xq[None, :]
        result = tl.sum(acc, axis=1)
        if not BLOCK_SCALED:
            result = result * xs * tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
        if HAS_BIAS:
            result += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + offs_n, result.to(out_ptr.dtype.element_ty), mask=n_mask)

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in (
                (16, 64, 4, 4), (16, 128, 4, 3), (64, 128, 4, 4), (64, 128, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4),
            )
        ],
        key=["N", "K", "M_BUCKET"],
    )  # fmt: skip
    @triton.jit
    def _block_gemm_kernel(
        a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K,
        stride_a, stride_as, stride_b, stride_bs, stride_c, BLOCK_SCALE_N, M_BUCKET,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kt in range(0, tl.cdiv(K, BLOCK_K)):
            k_idx = kt * BLOCK_K + offs_k
            k_mask = k_idx < K
            a = tl.load(
                a_ptr + offs_m[:, None] * stride_a + k_idx[None, :],
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            b = tl.load(
                b_ptr + offs_n[:, None] * stride_b + k_idx[None, :],
                mask=n_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            a_s = tl.load(as_ptr + offs_m * stride_as + kt, mask=m_mask, other=0.0)
            b_s = tl.load(bs_ptr + (offs_n // BLOCK_SCALE_N) * stride_bs + kt, mask=n_mask, other=0.0)
            acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(
            c_ptr + offs_m[:, None] * stride_c + offs_n[None, :],
            acc.to(c_ptr.dtype.element_ty),
            mask=m_mask[:, None] & n_mask[None, :],
        )
