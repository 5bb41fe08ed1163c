"""One MLA decode step: the reference cached MLA (latent cache expanded every step) vs the absorbed one.

DeepSeek-V3 attention shapes (128 heads, nope 128, rope 64, v 128, latent rank 512), batch 1, fp32 on
this machine's CPU, for a few cache lengths. Each is timed by ``torch.utils.benchmark.Timer`` (as many
runs as fit ``--min-run-s``); prints and optionally writes (``--out``) the median milliseconds of each,
their interquartile ranges and the ratio of the medians; both run in the same process on the same inputs.

    .venv/bin/python benchmarks/mla_decode.py --out benchmarks/results/mla_decode_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from onboardlm.registry.atomic import atomic_write_text
from onboardlm.transforms import cached_ops
from onboardlm.transforms.fast_mla import fast_cached_mla

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import kernel_timing  # noqa: E402  (benchmarks/timing.py)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-lens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--min-run-s", type=float, default=1.0, help="seconds of timed runs per figure")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with torch.inference_mode():
        for kv_len in args.kv_lens:
            inputs = _inputs(kv_len)
            timings = {
                name: kernel_timing(lambda fn=fn, inputs=inputs: fn(**inputs), "cpu", args.min_run_s)
                for name, fn in (("reference", cached_ops.cached_mla._init_fn), ("absorbed", fast_cached_mla))
            }
            row: dict[str, float] = {"kv_len": kv_len}
            for name, timing in timings.items():
                row[f"{name}_ms"], row[f"{name}_iqr_ms"] = timing.median_ms, timing.iqr_ms
            row["speedup"] = row["reference_ms"] / row["absorbed_ms"]
            rows.append(row)
            print(f"kv_len {kv_len}: reference {row['reference_ms']:.2f} ms (IQR {row['reference_iqr_ms']:.2f}), "
                  f"absorbed {row['absorbed_ms']:.2f} ms (IQR {row['absorbed_iqr_ms']:.2f}), "
                  f"{row['speedup']:.1f}x")  # fmt: skip
    if args.out:
        meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
        atomic_write_text(
            args.out, json.dumps({**meta, "torch": torch.__version__, "rows": rows}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
