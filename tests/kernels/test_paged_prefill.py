"""The Triton paged prefill kernel against the reference paged op, under Triton's CPU interpreter.

Packed steps mix prompts, prompt chunks appended to a cached prefix and one-token decodes, over block
caches handed out in shuffled order whose unreadable slots hold NaN (reading one would show). Cases
cover GQA (groups 2, 3, 4) and MHA, a sliding window, head dims 64, 80, 96 and 256 (keys 96 with values
64), block sizes 16 and 32, and sequences cut into several query tiles with a partial last tile; each
runs under the default launch configuration and two small ones (GQA group in one program, one head per
program). The expected result is the reference paged op in float64 on the same inputs. The same cases
through ``fast_paged_attention`` check that a step with prompt tokens runs the prefill kernel and a decode
step the split-K decode kernel.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("triton")

import onboardlm.ops  # noqa: E402, F401
from onboardlm.kernels.paged_prefill import PrefillConfig, launch_config  # noqa: E402
from onboardlm.transforms import paged_ops  # noqa: E402

#: (query heads, KV heads, key dim, value dim, block size, (cached, new) per sequence, window, layout)
CASES = {
    "mixed_gqa4_d64_b16": (8, 2, 64, 64, 16, ((0, 37), (70, 1), (16, 9), (129, 1), (5, 20)), 0, "bsnd"),
    "chunks_mha_d80_b32": (4, 4, 80, 80, 32, ((0, 45), (33, 14), (64, 3)), 0, "bnsd"),
    "window_gqa2_d96_b16": (4, 2, 96, 96, 16, ((40, 30), (0, 50), (3, 1)), 24, "bsnd"),
    "gqa3_dk96_dv64_b32": (6, 2, 96, 64, 32, ((10, 23), (0, 1), (50, 17)), 0, "bnsd"),
    "window_d256_b16": (2, 1, 256, 256, 16, ((20, 19),), 12, "bsnd"),
    "decodes_gqa4_d64_b16": (8, 2, 64, 64, 16, ((5, 1), (0, 1), (200, 1)), 0, "bnsd"),
}
#: Small launch configurations: several query tiles per prompt, key tiles smaller than a block.
CONFIGS = {
    "grouped_m16_n16": PrefillConfig(block_m=16, block_n=16, group_heads=True, num_warps=4, num_stages=1),
    "per_head_m16_n32": PrefillConfig(block_m=16, block_n=32, group_heads=False, num_warps=4, num_stages=1),
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


def _case(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    heads, kv_heads, dim_k, dim_v, block, seqs, window, layout = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    need = [-(-(c + n) // block) for c, n in seqs]
    width = max(need) + 1  # a spare column: entries past a sequence's blocks are never read
    num_blocks = sum(need) + 3
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[pool.pop() for _ in range(k)] for k in need]
    k_cache = torch.full((num_blocks, block, kv_heads, dim_k), float("nan"))
    v_cache = torch.full((num_blocks, block, kv_heads, dim_v), float("nan"))
    slots = []
    for table, (cached, new) in zip(tables, seqs, strict=True):
        for pos in range(cached):
            slot = table[pos // block] * block + pos % block
            k_cache.view(-1, kv_heads, dim_k)[slot] = torch.randn(kv_heads, dim_k, generator=gen)
            v_cache.view(-1, kv_heads, dim_v)[slot] = torch.randn(kv_heads, dim_v, generator=gen)
        slots += [table[p // block] * block + p % block for p in range(cached, cached + new)]
    tokens = sum(n for _, n in seqs)

    def packed(n: int, d: int) -> torch.Tensor:
        shape = (1, tokens, n, d) if layout == "bsnd" else (1, n, tokens, d)
        return torch.randn(shape, generator=gen)

    tensors = {
        "query": packed(heads, dim_k), "key": packed(kv_heads, dim_k), "value": packed(kv_heads, dim_v),
        "k_cache": k_cache, "v_cache": v_cache,
    }  # fmt: skip
    tensors = {k: t.to(torch.float16) for k, t in tensors.items()}
    tensors |= {
        "slot_mapping": torch.tensor(slots),
        "block_tables": torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        "query_start": torch.tensor([0] + [n for _, n in seqs]).cumsum(0),
        "cached_lens": torch.tensor([c for c, _ in seqs]),
    }
    configs = {"default": launch_config(max(dim_k, dim_v))} | CONFIGS
    options = {
        "scale": 1 / math.sqrt(dim_k) * 1.1, "sliding_window": window or None, "layout": layout,
        "configs": {label: asdict(config) for label, config in configs.items()},
    }  # fmt: skip
    return tensors, options


def _expected(tensors: dict[str, torch.Tensor], options: dict) -> torch.Tensor:
    """The reference paged op in float64 (NaN slots as 0: they are masked), in the case's layout."""
    args = [tensors[n] for n in NAMES]
    args[:5] = [a.double().nan_to_num() for a in args[:5]]
    kwargs = {k: options[k] for k in ("scale", "sliding_window", "layout")}
    return paged_ops.paged_attention._init_fn(*args, True, **kwargs)


def _rmse_ratio(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, torch.Tensor]]:
    """Every case through the kernel in a child process under ``TRITON_INTERPRET=1``."""
    folder = tmp_path_factory.mktemp("prefill")
    cases = {name: _case(name) for name in CASES}
    save_file(
        {f"{n}.{k}": t for n, (tensors, _) in cases.items() for k, t in tensors.items()}, folder / "c.st"
    )
    (folder / "c.st.json").write_text(json.dumps({n: options for n, (_, options) in cases.items()}))
    run = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_run_prefill_interpreted.py")), str(folder / "c.st"),
         str(folder / "out.st")],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return cases, load_file(folder / "out.st")


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_prefill_kernel_matches_the_reference_op(name: str, interpreted: tuple) -> None:
    cases, outputs = interpreted
    tensors, options = cases[name]
    expected = _expected(tensors, options)  # [1, T, n, d_v] or [1, n, T, d_v]
    packed = expected[0] if options["layout"] == "bsnd" else expected[0].transpose(0, 1)  # [T, n, d_v]
    for label in options["configs"]:
        got = outputs[f"{name}.{label}"]
        assert got.shape == packed.shape and got.dtype == torch.float16, label
        assert torch.isfinite(got).all(), f"{label}: the kernel read a slot it may not read"
        assert _rmse_ratio(got, packed) < 0.01, f"{label}: RMSE ratio {_rmse_ratio(got, packed):.2e}"
        assert (got.double() - packed).abs().max() < 0.02, label


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_fast_path_picks_the_kernel_by_shape(name: str, interpreted: tuple) -> None:
    """Prompt tokens in the step: the prefill kernel; one token per sequence: the decode kernel."""
    cases, outputs = interpreted
    tensors, options = cases[name]
    prompt = tensors["query_start"][-1] > tensors["block_tables"].shape[0]
    assert outputs[f"{name}.calls"].tolist() == ([1, 0] if prompt else [0, 1])
    expected = _expected(tensors, options)
    got = outputs[f"{name}.fast"]
    assert got.shape == expected.shape and torch.isfinite(got).all()
    assert _rmse_ratio(got, expected) < 0.01


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_prefill_kernel_matches_the_reference_op(name: str, dtype: torch.dtype) -> None:
    from onboardlm.kernels.paged_prefill import paged_prefill_attention

    tensors, options = _case(name)
    cuda = {k: t.to("cuda", dtype if t.is_floating_point() else t.dtype) for k, t in tensors.items()}
    layout, window = options["layout"], options["sliding_window"] or 0
    for cache, new in ((cuda["k_cache"], cuda["key"]), (cuda["v_cache"], cuda["value"])):
        rows = new[0] if layout == "bsnd" else new[0].transpose(0, 1)
        paged_ops.write_slots(cache, rows, cuda["slot_mapping"])
    query = cuda["query"][0] if layout == "bsnd" else cuda["query"][0].transpose(0, 1).contiguous()
    expected = _expected({k: t.cpu() for k, t in cuda.items()}, options)
    packed = expected[0] if layout == "bsnd" else expected[0].transpose(0, 1)
    for label, config in options["configs"].items():
        got = paged_prefill_attention(
            query, cuda["k_cache"], cuda["v_cache"], cuda["block_tables"], cuda["query_start"],
            cuda["cached_lens"], options["scale"], window, PrefillConfig(**config),
        ).cpu()  # fmt: skip
        assert torch.isfinite(got).all(), label
        assert _rmse_ratio(got, packed) < 0.01, f"{label}: RMSE ratio {_rmse_ratio(got, packed):.2e}"
