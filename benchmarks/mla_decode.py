"""One MLA decode step: the reference cached MLA (latent cache expanded every step) vs the absorbed one.

DeepSeek-V3 attention shapes (128 heads, nope 128, rope 64, v 128, latent rank 512), batch 1, fp32 on
this machine's CPU, for a few cache lengths. Prints and optionally writes (``--out``) the median
milliseconds of each and their ratio; both run in the same process on the same inputs.

    .venv/bin/python benchmarks/mla_decode.py --out benchmarks/results/mla_decode_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from onboardlm.transforms import cached_ops
from onboardlm.transforms.fast_mla import fast_cached_mla

HEADS, NOPE, ROPE, V, RANK = 128, 128, 64, 128, 512


def _inputs(kv_len: int) -> dict:
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    return {
        "q_nope": rand(1, 1, HEADS, NOPE), "q_pe": rand(1, 1, HEADS, ROPE),
        "compressed_kv": rand(1, 1, RANK), "kpe": rand(1, 1, 1, ROPE),
        "kv_b_proj_weight": rand(HEADS * (NOPE + V), RANK) * 0.05,
        "ckv_cache": rand(1, kv_len, RANK), "kpe_cache": rand(1, kv_len, 1, ROPE),
        "input_pos": torch.tensor([kv_len - 1]), "kv_len": kv_len,
    }  # fmt: skip


def _median_ms(fn, inputs: dict, reps: int) -> float:
    fn(**inputs)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(**inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-lens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with torch.inference_mode():
        for kv_len in args.kv_lens:
            inputs = _inputs(kv_len)
            reference = _median_ms(cached_ops.cached_mla._init_fn, inputs, args.reps)
            absorbed = _median_ms(fast_cached_mla, inputs, args.reps)
            rows.append({"kv_len": kv_len, "reference_ms": reference, "absorbed_ms": absorbed,
                         "speedup": reference / absorbed})  # fmt: skip
            print(f"kv_len {kv_len}: reference {reference:.2f} ms, absorbed {absorbed:.2f} ms, "
                  f"{reference / absorbed:.1f}x")  # fmt: skip
    if args.out:
        meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
        args.out.write_text(json.dumps({**meta, "torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
