"""FP8 probe: the fused FP8 linear path against the reference op and bf16, on one 8B-shaped linear stack.

Run on a GPU (``python benchmarks/fp8_probe.py --out results.json``). Checks the fused op's numbers
against ``torch_fake_quant_fp8_linear`` (per channel, per tensor, static, block scales, bias; one token,
a few, 2048), then times the linears of 32 Llama-3-8B layers (fused qkv [6144, 4096], o [4096, 4096],
gate_up [28672, 4096], down [4096, 14336]) at one token (decode, replayed from a CUDA graph) and
2048 tokens (prefill), bf16 ``F.linear`` against the FP8 kernels; reports times, weight bandwidth and
the ratios. ``--tiny`` runs small shapes on the CPU (``TRITON_INTERPRET=1``) to check the script.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch
import torch.nn.functional as F

from onboardlm.kernels import fp8_linear as K
from onboardlm.ops.quantization import FP8_DTYPE, torch_fake_quant_fp8_linear
from onboardlm.transforms.quantize_fp8 import quantize_weight_per_channel

SHAPES_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def block_quant(w: torch.Tensor, bn: int = 128, bk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    wp = F.pad(w.float(), (0, -k % bk, 0, -n % bn))
    blocks = wp.unflatten(0, (-1, bn)).unflatten(2, (-1, bk))  # [N/bn, bn, K/bk, bk]
    scale = (blocks.abs().amax(dim=(1, 3)) / 448).clamp_min(1e-12)
    q = (blocks / scale[:, None, :, None]).clamp(-448, 448).flatten(2).flatten(0, 1)[:n, :k].to(FP8_DTYPE)
    return q.contiguous(), scale


def correctness(device: torch.device, tiny: bool) -> list[dict]:
    rows = []
    n, k = (256, 384) if tiny else (4096, 14336)
    torch.manual_seed(0)
    w = torch.randn(n, k, device=device) * 0.02
    bias = torch.randn(n, device=device, dtype=torch.bfloat16)
    wq, ws = quantize_weight_per_channel(w)
    wt = (w.abs().amax() / 448).reshape(())
    wqt = (w / wt).clamp(-448, 448).to(FP8_DTYPE)
    wqb, wsb = block_quant(w)
    cases = {
        "channel": (wq, ws, [], None),
        "channel+bias": (wq, ws, [], bias),
        "tensor": (wqt, wt, [], None),
        "static": (wq, ws, [torch.tensor(0.02, device=device)], None),
        "block": (wqb, wsb, [], None),
        "block+bias": (wqb, wsb, [], bias),
    }
    for m in (1, 7, 64 if tiny else 2048):
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        for name, (q, s, inp, b) in cases.items():
            try:
                ref = torch_fake_quant_fp8_linear(x, q, b, inp, [s], [], [])
                ok = K.is_available(x, q, s)
                out = K.fp8_linear(x, q, b, inp[0] if inp else None, s)
                rows.append(
                    {
                        "case": name,
                        "tokens": m,
                        "fused": ok,
                        "rel_rmse": rel_rmse(out, ref),
                        "max_abs": float((out.float() - ref.float()).abs().max()),
                        "ref_absmax": float(ref.float().abs().max()),
                    }
                )
            except Exception as err:  # recorded, the probe goes on
                rows.append({"case": name, "tokens": m, "error": repr(err)[:400]})
    return rows


def _timed(fn, iters: int, device: torch.device) -> float:
    """Milliseconds per call of ``fn`` (CUDA events), after warm-up."""
    for _ in range(3):
        fn()
    if device.type != "cuda":
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) * 1e3 / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _graphed(fn, device: torch.device):
    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def speed(device: torch.device, tiny: bool, layers: int) -> dict:
    shapes = {k: (n // 16, kk // 16) for k, (n, kk) in SHAPES_8B.items()} if tiny else SHAPES_8B
    torch.manual_seed(0)
    bf16, fp8, blk = [], [], []
    for _ in range(layers):
        lw, lq, lb = {}, {}, {}
        for name, (n, k) in shapes.items():
            w = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
            lw[name] = w
            lq[name] = quantize_weight_per_channel(w)
            lb[name] = block_quant(w)
        bf16.append(lw)
        fp8.append(lq)
        blk.append(lb)
    weight_bytes_bf16 = sum(w.numel() * 2 for lw in bf16 for w in lw.values())
    weight_bytes_fp8 = weight_bytes_bf16 // 2
    out: dict = {"layers": layers, "weight_gb_bf16": weight_bytes_bf16 / 1e9}
    for tokens, label in ((1, "decode_bs1"), (64 if tiny else 2048, "prefill")):
        xs = {
            k: torch.randn(tokens, kk, device=device, dtype=torch.bfloat16) for k, (n, kk) in shapes.items()
        }

        def run_bf16(xs=xs):
            for lw in bf16:
                for name, w in lw.items():
                    F.linear(xs[name], w)

        def run_fp8(xs=xs):
            for lq in fp8:
                for name, (q, s) in lq.items():
                    K.fp8_linear(xs[name], q, None, None, s)

        def run_block(xs=xs):
            for lb in blk:
                for name, (q, s) in lb.items():
                    K.fp8_linear(xs[name], q, None, None, s)

        variants = {"bf16": run_bf16, "fp8_channel": run_fp8, "fp8_block": run_block}
        iters = 20 if tokens == 1 else 5
        for name, fn in variants.items():
            try:
                call = _graphed(fn, device) if tokens == 1 else fn
                out[f"{label}_{name}_ms"] = _timed(call, iters, device)
            except Exception:
                out[f"{label}_{name}_error"] = traceback.format_exc()[-600:]
        if tokens == 1:  # the GEMM path at one token, for the choice of GEMV_MAX_TOKENS
            saved = K.GEMV_MAX_TOKENS
            K.GEMV_MAX_TOKENS = 0
            try:
                out[f"{label}_fp8_channel_scaled_mm_ms"] = _timed(_graphed(run_fp8, device), iters, device)
            except Exception:
                out[f"{label}_fp8_channel_scaled_mm_error"] = traceback.format_exc()[-600:]
            finally:
                K.GEMV_MAX_TOKENS = saved
        else:
            K.FAST_ACCUM = True
            try:
                out[f"{label}_fp8_channel_fast_accum_ms"] = _timed(run_fp8, iters, device)
            except Exception:
                out[f"{label}_fp8_channel_fast_accum_error"] = traceback.format_exc()[-600:]
            finally:
                K.FAST_ACCUM = False
        base = out.get(f"{label}_bf16_ms")
        for name in ("fp8_channel", "fp8_block", "fp8_channel_scaled_mm", "fp8_channel_fast_accum"):
            t = out.get(f"{label}_{name}_ms")
            if base and t:
                out[f"{label}_{name}_speedup_vs_bf16"] = base / t
        if tokens == 1:
            for name, nbytes in (("bf16", weight_bytes_bf16), ("fp8_channel", weight_bytes_fp8)):
                t = out.get(f"{label}_{name}_ms")
                if t:
                    out[f"{label}_{name}_weight_tb_per_s"] = nbytes / (t * 1e-3) / 1e12
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="fp8_probe.json")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    result: dict = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    for name, fn in (
        ("correctness", lambda: correctness(device, args.tiny)),
        ("speed", lambda: speed(device, args.tiny, 2 if args.tiny else args.layers)),
    ):
        started = time.perf_counter()
        try:
            result[name] = fn()
        except Exception:
            result[name] = {"error": traceback.format_exc()[-1500:]}
        result[f"{name}_seconds"] = time.perf_counter() - started
        print(json.dumps({name: result[name]}, indent=1)[:6000], flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
