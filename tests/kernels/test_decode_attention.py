"""The Triton decode-attention kernel against float64 attention over each sequence's valid keys.

Cache positions a sequence may not read (after ``input_pos``, before its sliding window, rows of
other sequences) hold NaN, so reading one would show; so does the slot at ``input_pos``, which the
kernel must fill with the step's new key and value before reading it. On the CPU the kernel runs under Triton's
interpreter (in fp16: the interpreter has no bf16) in a child process; on a GPU in bf16 and fp16.
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

from onboardlm.kernels.decode_attention import decode_attention  # noqa: E402

#: (batch, query heads, KV heads, head dim, cache length, sliding window or 0)
CASES = {
    "gqa4_d128": (1, 32, 8, 128, 640, 0),
    "gqa3_d64_batch3": (3, 9, 3, 64, 200, 0),
    "mha_d32": (2, 4, 4, 32, 130, 0),
    "gqa3_d80_window": (2, 6, 2, 80, 300, 50),
    "gqa8_d256_short": (2, 16, 2, 256, 40, 0),
}


def _case(name: str, dtype: torch.dtype, device: str) -> dict:
    batch, heads, kv_heads, head_dim, kv_len, window = CASES[name]
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    query = torch.randn(batch, heads, head_dim, generator=generator)
    key = torch.randn(batch, kv_heads, head_dim, generator=generator)
    value = torch.randn(batch, kv_heads, head_dim, generator=generator)
    cache_shape = (batch + 1, kv_len + 7, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=generator)
    v_cache = torch.randn(cache_shape, generator=generator)
    input_pos = torch.randint(0, kv_len, (batch,), generator=generator)
    input_pos[0] = kv_len - 1
    if batch > 1:
        input_pos[1] = 0
    for row, pos in enumerate(input_pos.tolist()):
        first = max(0, pos + 1 - window) if window else 0
        k_cache[row, :first] = v_cache[row, :first] = float("nan")
        k_cache[row, pos:] = v_cache[row, pos:] = float("nan")
    k_cache[batch:] = v_cache[batch:] = float("nan")
    tensors = {"query": query, "key": key, "value": value, "k_cache": k_cache, "v_cache": v_cache}
    tensors = {key: value.to(device=device, dtype=dtype) for key, value in tensors.items()}
    return {**tensors, "input_pos": input_pos.to(device), "kv_len": kv_len, "scale": 1 / math.sqrt(head_dim),
            "window": window}  # fmt: skip


def _expected(case: dict) -> torch.Tensor:
    """Softmax attention in float64 over keys ``first .. input_pos - 1`` of the cache and the new key."""
    query = case["query"].double().cpu()
    groups = query.shape[1] // case["k_cache"].shape[2]
    rows = []
    for row, pos in enumerate(case["input_pos"].tolist()):
        first = max(0, pos + 1 - case["window"]) if case["window"] else 0
        keys = torch.cat([case["k_cache"][row, first:pos], case["key"][row, None]]).double().cpu()
        values = torch.cat([case["v_cache"][row, first:pos], case["value"][row, None]]).double().cpu()
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        scores = torch.einsum("hd,khd->hk", query[row], keys) * case["scale"]
        rows.append(torch.einsum("hk,khd->hd", scores.softmax(-1), values))
    return torch.stack(rows)


def _check(name: str, got: torch.Tensor, caches: tuple[torch.Tensor, torch.Tensor], case: dict) -> None:
    expected = _expected(case)
    rows = torch.arange(len(case["input_pos"]))
    for cache, new in zip(caches, (case["key"], case["value"]), strict=True):
        assert torch.equal(cache[rows, case["input_pos"].cpu()].cpu(), new.cpu()), (
            f"{name}: cache not written"
        )
    assert got.shape == expected.shape and got.dtype == case["query"].dtype
    assert torch.isfinite(got).all(), f"{name}: the kernel read a key it may not read"
    error = (got.double().cpu() - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()
    assert error < 0.01, f"{name}: RMSE ratio {error:.2e}"


def _interpreted(script: str, *paths: Path) -> dict[str, torch.Tensor]:
    """Run ``script`` (beside this file) under Triton's interpreter; its last path is what it writes."""
    run = subprocess.run(
        [sys.executable, str(Path(__file__).with_name(script)), *map(str, paths)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return load_file(paths[-1])


def test_interpreted_kernel_matches_float64(tmp_path: Path) -> None:
    cases = {name: _case(name, torch.float16, "cpu") for name in CASES}
    tensors = {f"{name}.{key}": value for name, case in cases.items() for key, value in case.items()
               if isinstance(value, torch.Tensor)}  # fmt: skip
    scalars = {name: {k: case[k] for k in ("kv_len", "scale", "window")} for name, case in cases.items()}
    save_file(tensors, tmp_path / "cases.safetensors")
    (tmp_path / "cases.safetensors.json").write_text(json.dumps(scalars))
    outputs = _interpreted(
        "_run_interpreted.py", tmp_path / "cases.safetensors", tmp_path / "out.safetensors"
    )
    for name, case in cases.items():
        _check(name, outputs[name], (outputs[f"{name}.k_cache"], outputs[f"{name}.v_cache"]), case)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_kernel_matches_float64(name: str, dtype: torch.dtype) -> None:
    case = _case(name, dtype, "cuda")
    caches = case["k_cache"].clone(), case["v_cache"].clone()
    got = decode_attention(case["query"], case["key"], case["value"], *caches, case["input_pos"],
                           case["kv_len"], case["scale"], case["window"])  # fmt: skip
    _check(name, got, caches, case)


def test_cached_graph_decodes_through_the_kernel_as_through_sdpa(tmp_path: Path) -> None:
    """The fast path's wiring (head/KV layouts, cache writes) on the CPU, under the interpreter."""
    out = _interpreted("_run_graph_interpreted.py", tmp_path / "out.safetensors")
    assert int(out["kernel_calls"]) == 3 * 2  # three decode steps, two layers
    kernel, sdpa = out["kernel"].float(), out["sdpa"].float()
    error = (kernel - sdpa).pow(2).mean().sqrt() / sdpa.pow(2).mean().sqrt()
    assert error < 0.01, f"RMSE ratio {error:.2e}"
