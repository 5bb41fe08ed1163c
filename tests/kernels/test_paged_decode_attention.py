"""The Triton paged attention kernels (through ``fast_paged_attention``) against the reference paged op.

A packed step mixes one-token decodes with prompt chunks (fresh, and appended to a cached prefix) over a
block cache whose blocks are handed out in shuffled order; every slot no sequence may read holds NaN, so
reading one would show. The reference paged op in float64 on the same inputs is the expected result
(its own equivalence to the dense cached op is tested in tests/transforms/test_paged_attention.py).
On the CPU the kernel runs under Triton's interpreter (fp16) in a child process; on a GPU in bf16 and fp16.
Under the interpreter, the serving engine's fast path (the kernels inside the rewritten graph: prefill for
steps with prompt tokens, split-K decode for decode steps padded as on CUDA) must also give a tiny fp16
Llama's requests the reference engine's tokens.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("triton")

import onboardlm.ops  # noqa: E402, F401
from onboardlm.transforms import paged_ops  # noqa: E402

#: (query heads, KV heads, head dim, block size, (cached, new) per sequence, sliding window, layout)
CASES = {
    "mixed_gqa4_d128": (8, 2, 128, 16, ((0, 37), (70, 1), (16, 9), (129, 1)), 0, "bsnd"),
    "decodes_gqa3_d64": (6, 2, 64, 16, ((5, 1), (0, 1), (200, 1)), 0, "bnsd"),
    "window_mha_d32": (4, 4, 32, 8, ((40, 1), (3, 20), (90, 5)), 24, "bsnd"),
    "prefill_only_d80": (4, 2, 80, 4, ((0, 70),), 0, "bnsd"),
}
NAMES = (
    "query",
    "key",
    "value",
    "k_cache",
    "v_cache",
    "slot_mapping",
    "block_tables",
    "query_start",
    "cached_lens",
)


def _interpreted(script: str, *paths: Path) -> dict[str, torch.Tensor]:
    """Run ``script`` (beside this file) under Triton's interpreter; its last path is what it writes."""
    run = subprocess.run(
        [sys.executable, str(Path(__file__).with_name(script)), *map(str, paths)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return load_file(paths[-1])


def _case(name: str, dtype: torch.dtype, device: str) -> tuple[dict, dict]:
    heads, kv_heads, dim, block, seqs, window, layout = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    need = [-(-(c + n) // block) for c, n in seqs]
    width = max(need) + 1  # a spare column: entries past a sequence's blocks are never read
    pool = torch.randperm(sum(need) + 3, generator=gen).tolist()
    tables = [[pool.pop() for _ in range(k)] for k in need]
    num_blocks = sum(need) + 3
    k_cache = torch.full((num_blocks, block, kv_heads, dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    slots = []
    for table, (cached, new) in zip(tables, seqs, strict=True):
        for pos in range(cached):
            slot = table[pos // block] * block + pos % block
            k_cache.view(-1, kv_heads, dim)[slot] = torch.randn(kv_heads, dim, generator=gen)
            v_cache.view(-1, kv_heads, dim)[slot] = torch.randn(kv_heads, dim, generator=gen)
        slots += [table[p // block] * block + p % block for p in range(cached, cached + new)]
    tokens = sum(n for _, n in seqs)
    shape = (1, tokens, heads, dim) if layout == "bsnd" else (1, heads, tokens, dim)
    kv_shape = (1, tokens, kv_heads, dim) if layout == "bsnd" else (1, kv_heads, tokens, dim)
    tensors = {
        "query": torch.randn(shape, generator=gen), "key": torch.randn(kv_shape, generator=gen),
        "value": torch.randn(kv_shape, generator=gen), "k_cache": k_cache, "v_cache": v_cache,
    }  # fmt: skip
    tensors = {k: t.to(device=device, dtype=dtype) for k, t in tensors.items()}
    padded = [t + [0] * (width - len(t)) for t in tables]
    tensors |= {
        "slot_mapping": torch.tensor(slots), "block_tables": torch.tensor(padded),
        "query_start": torch.tensor([0] + [n for _, n in seqs]).cumsum(0),
        "cached_lens": torch.tensor([c for c, _ in seqs]),
    }  # fmt: skip
    tensors = {k: t.to(device) for k, t in tensors.items()}
    options = {"scale": 1 / math.sqrt(dim) * 1.1, "sliding_window": window or None, "layout": layout}
    return tensors, options


def _expected(tensors: dict, options: dict) -> torch.Tensor:
    args = [tensors[n].cpu() for n in NAMES]
    args[:5] = [a.double().nan_to_num() for a in args[:5]]  # masked slots: 0 instead of NaN
    return paged_ops.paged_attention._init_fn(*args, True, **options)


def _check(
    name: str, got: torch.Tensor, caches: tuple[torch.Tensor, ...], tensors: dict, options: dict
) -> None:
    layout = options["layout"]
    for cache, new in zip(caches, (tensors["key"], tensors["value"]), strict=True):
        rows = new[0] if layout == "bsnd" else new[0].transpose(0, 1)
        written = cache.reshape(-1, *cache.shape[2:])[tensors["slot_mapping"].to(cache.device)]
        assert torch.equal(written.cpu(), rows.cpu()), f"{name}: cache not written"
    expected = _expected(tensors, options)
    assert got.shape == expected.shape and got.dtype == tensors["query"].dtype
    assert torch.isfinite(got).all(), f"{name}: the kernel read a slot it may not read"
    error = (got.double().cpu() - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()
    assert error < 0.01, f"{name}: RMSE ratio {error:.2e}"


def test_interpreted_paged_kernel_matches_the_reference_op(tmp_path: Path) -> None:
    cases = {name: _case(name, torch.float16, "cpu") for name in CASES}
    save_file(
        {f"{n}.{k}": t for n, (tensors, _) in cases.items() for k, t in tensors.items()}, tmp_path / "c.st"
    )
    (tmp_path / "c.st.json").write_text(json.dumps({n: options for n, (_, options) in cases.items()}))
    outputs = _interpreted("_run_paged_interpreted.py", tmp_path / "c.st", tmp_path / "out.st")
    for name, (tensors, options) in cases.items():
        caches = outputs[f"{name}.k_cache"], outputs[f"{name}.v_cache"]
        _check(name, outputs[name], caches, tensors, options)


def test_interpreted_fast_path_engine_gives_the_reference_tokens(tmp_path: Path) -> None:
    """The serving engine on a tiny fp16 Llama: fast path (paged prefill and decode kernels, padded decode
    steps) = reference."""
    run = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_run_paged_engine_interpreted.py")), str(tmp_path / "o")],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    answers = json.loads((tmp_path / "o").read_text())
    assert answers["kernel_calls"]["decode"] > 0 and answers["kernel_calls"]["prefill"] > 0
    assert answers["fast"] == answers["reference"] and len(answers["fast"]) == 6
    assert all(len(tokens) == 6 for tokens in answers["fast"].values())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_paged_kernel_matches_the_reference_op(name: str, dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from onboardlm.transforms.fast_paged import fast_paged_attention, kernel_runs

    tensors, options = _case(name, dtype, "cuda")
    args = [tensors[n].clone() for n in NAMES]
    assert kernel_runs(args[0], True, None, None)
    got = fast_paged_attention(*args, True, **options)
    _check(name, got, (args[3], args[4]), tensors, options)
