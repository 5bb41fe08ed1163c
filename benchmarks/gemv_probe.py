"""Batch-1 GEMV probe: cuBLAS (``F.linear``) against Triton GEMV tilings, bf16 and FP8 weights.

Run on a CUDA machine: ``PYTHONPATH=src python benchmarks/gemv_probe.py``. For each Llama-3-8B linear
shape (one token) it times cuBLAS bf16, the best of a grid of Triton tilings for bf16 weights (one pass
over ``K`` per program, and split-K with an fp32 atomic sum), the shipped FP8 GEMV
(:mod:`onboardlm.kernels.fp8_linear`) and the same tilings for FP8 weights with the activation quantised
once beforehand. Times are CUDA-graph replays (``triton.testing.do_bench_cudagraph``), so launch
overhead is left out; bandwidth = weight bytes / time. Writes ``gemv_probe_<gpu>.json`` under ``$OUT``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from onboardlm.kernels import fp8_linear
from onboardlm.ops.quantization import FP8_DTYPE

#: (name, N, K) of one Llama-3-8B layer's linears (q/k/v and gate/up concatenated) and the LM head.
SHAPES = (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
          ("lm_head", 128256, 4096))  # fmt: skip
#: (BLOCK_N, BLOCK_K, warps, stages) tried, each without and with a 2-way split of K.
TILES = ((8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 8, 3), (32, 256, 8, 3), (4, 1024, 4, 3), (8, 1024, 8, 3))
SPLITS = (1, 2)


@triton.jit
def _gemv(x_ptr, w_ptr, s_ptr, out_ptr, N, K, SPLIT_K: tl.constexpr, SCALED: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # each split a whole number of tiles
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(split * span, tl.minimum((split + 1) * span, K), BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        mask = (rows[:, None] < N) & (cols[None, :] < K)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=mask, other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    result = tl.sum(acc, axis=1)
    if SCALED:
        result = result * tl.load(s_ptr + rows, mask=rows < N, other=0.0)
    if SPLIT_K == 1:
        tl.store(out_ptr + rows, result, mask=rows < N)
    else:
        tl.atomic_add(out_ptr + rows, result, mask=rows < N)


def triton_gemv(x, w, scale, out, tile, split):
    bn, bk, warps, stages = tile
    n, k = w.shape
    if split > 1:
        out.zero_()
    _gemv[(triton.cdiv(n, bn), split)](x, w, scale, out, n, k, SPLIT_K=split, SCALED=scale is not None,
                                      BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)  # fmt: skip


def bench(fn) -> float:
    return do_bench_cudagraph(fn, rep=50)


def best_tiling(run, check=None) -> dict | None:
    """The fastest (tile, split) of :data:`TILES` x :data:`SPLITS` for ``run(tile, split)``."""
    best = None
    for tile in TILES:
        for split in SPLITS:
            try:
                run(tile, split)
                if check is not None and not check():
                    continue
                ms = bench(lambda t=tile, s=split: run(t, s))
            except Exception:  # noqa: BLE001, S112  (a tiling that does not compile is skipped)
                continue
            if best is None or ms < best["ms"]:
                best = {"ms": ms, "tile": tile, "split_k": split}
    return best


def probe_shape(n: int, k: int) -> dict:
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    ref = F.linear(x, w).float()[0]
    out = torch.empty(n, device="cuda", dtype=torch.float32)
    rec: dict = {"n": n, "k": k, "cublas_ms": bench(lambda: F.linear(x, w))}
    rec["triton_bf16_best"] = best_tiling(
        lambda t, s: triton_gemv(x, w, None, out, t, s), lambda: float((out - ref).abs().max()) < 0.05
    )
    scale = (w.abs().amax(dim=1).float() / 448.0).clamp(min=1e-12)
    wq = (w.float() / scale[:, None]).to(FP8_DTYPE)
    rec["fp8_shipped_ms"] = bench(lambda: fp8_linear.fp8_linear(x, wq, None, None, scale[:, None]))
    xs = x.float().abs().amax().clamp(min=1e-12) / 448.0
    xq = (x.float() / xs).to(FP8_DTYPE)
    rec["triton_fp8_prequant_best"] = best_tiling(lambda t, s: triton_gemv(xq, wq, scale, out, t, s))
    rec["cublas_tb_s"] = n * k * 2 / rec["cublas_ms"] / 1e9
    rec["fp8_shipped_tb_s"] = n * k / rec["fp8_shipped_ms"] / 1e9
    for key, size in (("triton_bf16_best", 2), ("triton_fp8_prequant_best", 1)):
        if rec[key]:
            rec[key]["tb_s"] = n * k * size / rec[key]["ms"] / 1e9
    return rec


def main() -> None:
    torch.manual_seed(0)
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    for name, n, k in SHAPES:
        result["shapes"][name] = probe_shape(n, k)
        print(name, json.dumps(result["shapes"][name]), flush=True)
    out_dir = Path(os.environ.get("OUT", "."))
    gpu = result["gpu"].replace(" ", "_").lower()
    (out_dir / f"gemv_probe_{gpu}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
