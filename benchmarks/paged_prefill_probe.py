"""Paged prefill probe: one attention layer of a packed prompt step, old path vs the prefill kernel vs SDPA.

Run on one GPU (``python benchmarks/paged_prefill_probe.py``; JSON under ``$OUT``, else the current
folder). Llama-3-8B attention shapes (32 query heads, 8 KV heads, head dim 128, bf16) over a paged cache
of ``--block-size`` tokens per block (the engine's 16), blocks handed out in shuffled order; the step's
keys are already in the cache, as in ``fast_paged_attention``. Steps: one prompt of 512 and of 2048,
8 x 512, 16 x 1024, and one prompt of 1024 with 63 decode tokens over 512-token caches. Each is timed
(``triton.testing.do_bench``, median) through

- ``old``: :func:`onboardlm.kernels.decode_attention.paged_decode_attention` (every token split-K);
- the prefill kernel :func:`onboardlm.kernels.paged_prefill.paged_prefill_attention` under each launch
  configuration of :data:`CONFIGS` (the first is the kernel's default for head dim 128);
- ``sdpa``: ``scaled_dot_product_attention`` (flash backend) on contiguous per-sequence K/V, heads
  already repeated for GQA: the ceiling (the mixed step: one causal call for the prompt, one for the
  decodes).

Max abs differences are against the SDPA output. Prints a table; a configuration that fails (e.g. out
of shared memory) is recorded with its error. ``--tiny`` runs small shapes on the CPU under
``TRITON_INTERPRET=1`` (fp16, which the interpreter reads correctly; one timing call each) to check the
script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton

from onboardlm.kernels.decode_attention import paged_decode_attention
from onboardlm.kernels.paged_prefill import PrefillConfig, launch_config, paged_prefill_attention

#: (query heads, KV heads, head dim)
SHAPE_8B = (32, 8, 128)
SHAPE_TINY = (4, 2, 64)
#: Steps: name -> (cached, new) per sequence.
STEPS = {
    "1x512": [(0, 512)],
    "1x2048": [(0, 2048)],
    "8x512": [(0, 512)] * 8,
    "16x1024": [(0, 1024)] * 16,
    "1x1024+63dec@512": [(0, 1024)] + [(512, 1)] * 63,
}
STEPS_TINY = {"1x40": [(0, 40)], "24+19+3dec@20": [(0, 24), (0, 19)] + [(20, 1)] * 3}
#: Launch configurations to compare (labels: m<block_m> n<block_n> g(rouped)|h(ead) w<warps> s<stages>).
CONFIGS = [
    launch_config(SHAPE_8B[2]),
    PrefillConfig(block_m=128, block_n=64, group_heads=True, num_warps=8, num_stages=3),
    PrefillConfig(block_m=64, block_n=64, group_heads=True, num_warps=4, num_stages=3),
    PrefillConfig(block_m=64, block_n=64, group_heads=True, num_warps=4, num_stages=2),
    PrefillConfig(block_m=128, block_n=32, group_heads=True, num_warps=8, num_stages=3),
    PrefillConfig(block_m=128, block_n=64, group_heads=False, num_warps=8, num_stages=2),
    PrefillConfig(block_m=64, block_n=32, group_heads=False, num_warps=4, num_stages=2),
]
CONFIGS_TINY = [
    PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1),
    launch_config(SHAPE_TINY[2]),
]


def label(config: PrefillConfig) -> str:
    mode = "g" if config.group_heads else "h"
    return f"m{config.block_m} n{config.block_n} {mode} w{config.num_warps} s{config.num_stages}"


def build_step(
    seqs: list[tuple[int, int]], shape: tuple[int, int, int], block_size: int, device: str, dtype: torch.dtype
) -> dict:
    """A packed step over a shuffled paged cache holding every position of every sequence."""
    heads, kv_heads, dim = shape
    gen = torch.Generator().manual_seed(0)
    need = [-(-(c + n) // block_size) for c, n in seqs]
    width = max(need)
    order = torch.randperm(sum(need), generator=gen)
    tables = torch.zeros(len(seqs), width, dtype=torch.long)
    used = 0
    for i, k in enumerate(need):
        tables[i, :k] = order[used : used + k]
        used += k
    cache_shape = (sum(need), block_size, kv_heads, dim)
    tokens = sum(n for _, n in seqs)
    step = {
        "query": torch.randn(tokens, heads, dim, generator=gen).to(device, dtype),
        "k_cache": torch.randn(cache_shape, generator=gen).to(device, dtype),
        "v_cache": torch.randn(cache_shape, generator=gen).to(device, dtype),
        "block_tables": tables.to(device),
        "query_start": torch.tensor([0] + [n for _, n in seqs]).cumsum(0).to(device),
        "cached_lens": torch.tensor([c for c, _ in seqs]).to(device),
    }
    return step


def sdpa_calls(step: dict, seqs: list[tuple[int, int]]) -> list[Any]:
    """SDPA on contiguous K/V: one call per group of sequences with equal (cached, new), heads repeated
    (a prompt from position 0, causal; or one decode token over its cache)."""
    heads, kv_heads = step["query"].shape[1], step["k_cache"].shape[2]
    calls = []
    groups: dict[tuple[int, int], list[int]] = {}
    for i, seq in enumerate(seqs):
        groups.setdefault(seq, []).append(i)
    starts = [0]
    for _, n in seqs:
        starts.append(starts[-1] + n)
    for (cached, new), members in groups.items():
        if cached and new > 1:
            raise ValueError(f"sdpa_calls: a chunk after a cached prefix ({cached}, {new}) is not supported")
        length = cached + new
        rows = [torch.arange(starts[i], starts[i] + new) for i in members]
        index = torch.stack(rows).to(step["query"].device)  # [B, new]
        q = step["query"][index].transpose(1, 2).contiguous()  # [B, H, new, d]
        kv = []
        for cache in (step["k_cache"], step["v_cache"]):
            blocks = cache[step["block_tables"][members]].flatten(1, 2)[:, :length]  # [B, L, n_kv, d]
            kv.append(blocks.repeat_interleave(heads // kv_heads, dim=2).transpose(1, 2).contiguous())
        calls.append((index, q, kv[0], kv[1], new > 1))
    return calls


def run_sdpa(calls: list[Any], out: torch.Tensor | None = None) -> torch.Tensor | None:
    """The SDPA calls; with ``out`` ``[T, n, d]``, their outputs scattered into it (not timed)."""
    for index, q, k, v, causal in calls:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1 / math.sqrt(q.shape[-1]))
        if out is not None:
            out[index] = o.transpose(1, 2)
    return out


def timed(fn: Any, device: str) -> float:
    """Median milliseconds (``do_bench`` on a GPU; one call on the CPU)."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def attention_flops(seqs: list[tuple[int, int]], heads: int, dim: int) -> float:
    """Causal attention FLOPs (two matmuls, keys each query may read)."""
    pairs = sum(new * cached + new * (new + 1) / 2 for cached, new in seqs)
    return 4.0 * heads * dim * pairs


def probe_step(seqs: list, shape: tuple, block_size: int, configs: list, device: str) -> dict:
    heads, kv_heads, dim = shape
    # Triton's CPU interpreter misreads bf16 (numpy has none): fp16 there.
    step = build_step(seqs, shape, block_size, device, torch.bfloat16 if device == "cuda" else torch.float16)
    scale = 1 / math.sqrt(dim)
    args = [step[k] for k in ("query", "k_cache", "v_cache", "block_tables", "query_start", "cached_lens")]
    flops = attention_flops(seqs, heads, dim)
    record: dict[str, Any] = {"seqs": len(seqs), "tokens": sum(n for _, n in seqs), "gflop": flops / 1e9}
    calls = sdpa_calls(step, seqs)
    backends = torch.nn.attention.SDPBackend
    with torch.nn.attention.sdpa_kernel(backends.FLASH_ATTENTION if device == "cuda" else backends.MATH):
        reference = run_sdpa(calls, torch.empty_like(step["query"])).float()
        record["sdpa_ms"] = timed(lambda: run_sdpa(calls), device)

    def measure(key: str, fn: Any) -> None:
        try:
            diff = float((fn().float() - reference).abs().max())
            ms = timed(fn, device)
            record[key] = {"ms": ms, "tflops": flops / ms / 1e9, "max_abs_diff": diff}
        except Exception as error:  # recorded: one failing configuration must not end the probe
            record[key] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
            traceback.print_exc()

    measure("old", lambda: paged_decode_attention(*args, scale, 0))
    for config in configs:
        measure(label(config), lambda c=config: paged_prefill_attention(*args, scale, 0, c))
    old = record["old"].get("ms")
    for config in configs:
        entry = record[label(config)]
        if "ms" in entry:
            entry["speedup_vs_old"] = old / entry["ms"] if old else None
            entry["fraction_of_sdpa"] = record["sdpa_ms"] / entry["ms"]
    return record


def print_table(results: dict, configs: list) -> None:
    labels = ["old", *map(label, configs)]
    print(f"{'step':>18} {'sdpa ms':>8} " + " ".join(f"{lab:>22}" for lab in labels))
    for name, record in results["steps"].items():
        cells = []
        for lab in labels:
            entry = record[lab]
            cells.append(f"{entry['ms']:9.3f} ({entry['max_abs_diff']:.1e})" if "ms" in entry else "error")
        print(f"{name:>18} {record['sdpa_ms']:8.3f} " + " ".join(f"{c:>22}" for c in cells))
    print("cells: milliseconds (max abs diff vs SDPA)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    shape, steps, configs = (
        (SHAPE_TINY, STEPS_TINY, CONFIGS_TINY) if args.tiny else (SHAPE_8B, STEPS, CONFIGS)
    )
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": {
            "heads": shape[0],
            "kv_heads": shape[1],
            "head_dim": shape[2],
            "dtype": "bfloat16" if device == "cuda" else "float16",
        },
        "block_size": args.block_size,
        "configs": {label(c): asdict(c) for c in configs},
        "default_config": label(launch_config(shape[2])),
        "steps": {},
    }
    for name, seqs in steps.items():
        results["steps"][name] = probe_step(seqs, shape, args.block_size, configs, device)
        print(name, json.dumps(results["steps"][name]), flush=True)
    path = Path(args.out) / "paged_prefill_probe.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print_table(results, configs)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
