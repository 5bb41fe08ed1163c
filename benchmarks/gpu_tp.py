"""Tensor-parallel benchmark: one model at TP=1 and TP=2, same random bf16 weights, same run.

Launch on a machine with two GPUs (NCCL)::

    PYTHONPATH=src torchrun --nproc-per-node 2 benchmarks/gpu_tp.py

or on the CPU over gloo, with tiny shapes, to check the code paths (``--smoke``). Every rank builds the
Llama-3-8B-shaped lean model from the same seed. Rank 0 first runs it alone (TP=1); then both ranks run
the graph sharded by its hints (``apply_sharding_hints``). Rank 0 compares the TP=2 prefill logits and
greedy tokens with TP=1's, measures decode tokens/s at each batch size for both, and writes
``gpu_tp_<gpu>.json`` and ``.md`` under ``$OUT`` (else ``benchmarks/results``). The figures and helpers
are those of ``benchmarks/gpu.py`` (prompt 512, 128 new tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.registry.atomic import atomic_write_text
from onboardlm.runtime.distributed import RankInfo, process_group, rank_device
from onboardlm.testing.metrics import rmse_ratio
from onboardlm.transforms.compile import SpeedOptions, accelerate
from onboardlm.transforms.sharding import apply_sharding_hints

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu  # noqa: E402  (benchmarks/gpu.py: shapes, graph building, timing)


def build(config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """The lean model with the benchmark's seeded random weights (the same on every rank)."""
    model = AutoModelForCausalLMFactory(config).build_model(gpu.DEV.device, dtype, init_weights=False)
    gpu.randomize(model)
    return model


def measure(graph: Any, batches: tuple[int, ...], vocab: int, cuda_graphs: bool) -> dict[str, Any]:
    """Prefill logits of one prompt, greedy tokens and decode tokens/s per batch size (fast path)."""
    max_seq = gpu.PROMPT + gpu.NEW_TOKENS
    cache = gpu.allocate_cache(graph.caches, max(batches), max_seq, gpu.DEV.device)
    fast = accelerate(graph.gm, cache, SpeedOptions(batch_sizes=batches, cuda_graphs=cuda_graphs))
    ids = torch.randint(0, vocab, (1, gpu.PROMPT), device=gpu.DEV.device, generator=gpu.torch_gen())
    zero = torch.zeros(1, dtype=torch.long, device=gpu.DEV.device)
    with torch.inference_mode():
        logits = gpu.run_graph(fast, ids, zero, zero + gpu.PROMPT - 1, gpu.PROMPT).float().cpu()
    result: dict[str, Any] = {"logits": logits, "capture": vars(fast.report)}
    for batch in batches:
        result[f"decode_bs{batch}"] = gpu.ours_decode(fast, batch, vocab)
    return result


def first_divergence(a: list[int], b: list[int]) -> int | None:
    same = [x == y for x, y in zip(a, b, strict=False)]
    return same.index(False) if False in same else None


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Tensor-parallel benchmark: {result['gpu']} x {result['world_size']} (torch {result['torch']})",
        "",
        f"TP={result['world_size']} vs TP=1 prefill logits, RMSE ratio: {result['logits_rmse_ratio']:.2e}; "
        f"greedy bs1 tokens first differ at step {result['greedy_first_divergence']} (None: all agree).",
        "",
        "| batch | TP=1 tok/s | TP=2 tok/s | TP=2 / TP=1 |",
        "| --- | --- | --- | --- |",
    ]
    for batch in result["batches"]:
        one, two = (result[f"tp{n}"][f"decode_bs{batch}"]["tok_s"] for n in (1, result["world_size"]))
        lines.append(f"| {batch} | {one:.1f} | {two:.1f} | {two / one:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, on the CPU over gloo")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="decode steps uncaptured")
    args = parser.parse_args()
    info = RankInfo.from_env()
    if args.smoke:
        gpu.DEV, gpu.PROMPT, gpu.NEW_TOKENS = gpu.Device("cpu"), 16, 8
    config, dtype = gpu.shapes(1, args.smoke)["8b"], torch.float32 if args.smoke else torch.bfloat16
    device = rank_device(info, gpu.DEV.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    gpu.DEV.device = str(device)
    batches = tuple(args.batches)
    result: dict[str, Any] = {"gpu": gpu.DEV.name(), "world_size": info.world_size, "torch": torch.__version__,
                              "batches": batches, "prompt": gpu.PROMPT, "new_tokens": gpu.NEW_TOKENS}  # fmt: skip
    with process_group(info, device.type):
        model = build(config, dtype)
        if info.rank == 0:
            result["tp1"] = measure(
                gpu.cached_graph(model), batches, config.vocab_size, not args.no_cuda_graphs
            )
            gpu.DEV.empty_cache()
        dist.barrier()
        shard = lambda gm: apply_sharding_hints(gm, info.rank, info.world_size)  # noqa: E731
        sharded = measure(gpu.cached_graph(model, shard), batches, config.vocab_size, not args.no_cuda_graphs)
        dist.barrier()
    if info.rank != 0:
        return
    result[f"tp{info.world_size}"] = sharded
    result["logits_rmse_ratio"] = rmse_ratio(sharded.pop("logits"), result["tp1"].pop("logits"))
    tokens = [result[f"tp{n}"]["decode_bs1" if 1 in batches else f"decode_bs{batches[0]}"]["tokens"]
              for n in (1, info.world_size)]  # fmt: skip
    result["greedy_first_divergence"] = first_divergence(*tokens)
    out = Path(os.environ.get("OUT", gpu.ROOT / "benchmarks" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_tp_" + result["gpu"].replace(" ", "_").lower()
    atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=1, default=str))
    atomic_write_text(out / f"{stem}.md", markdown(result))
    print(markdown(result), flush=True)


if __name__ == "__main__":
    main()
