"""The MoE decode kernels (``onboardlm.kernels.moe_decode``) against float64 experts.

On the CPU they run under Triton's interpreter in a subprocess (``_run_moe_interpreted.py``); on a GPU
(``-m gpu``) directly, at the Qwen3-MoE decode shape the benchmark measures.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

#: name: (tokens, top_k, experts, hidden, intermediate, dtype)
CASES = {
    "one_token_bf16": (1, 2, 8, 64, 48, torch.bfloat16),
    "three_tokens_bf16": (3, 2, 8, 80, 40, torch.bfloat16),
    "two_tokens_fp32": (2, 3, 6, 32, 24, torch.float32),
}


def _case(tokens: int, top_k: int, experts: int, hidden: int, inter: int, dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(hidden * 31 + tokens)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    return {
        "hidden": torch.randn(tokens, hidden, generator=gen).to(device, dtype),
        "ids": ids.to(device),
        "weights": (weights / weights.sum(-1, keepdim=True)).to(device),
        "gate_up": (torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.1).to(device, dtype),
        "w2": (torch.randn(experts, hidden, inter, generator=gen) * 0.1).to(device, dtype),
    }


def _expected(case: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum_j weight * down(silu(gate(x)) * up(x))`` per token, in float64."""
    inter = case["gate_up"].shape[1] // 2
    gate_up, w2 = case["gate_up"].double().cpu(), case["w2"].double().cpu()
    hidden, ids, weights = case["hidden"].double().cpu(), case["ids"].cpu(), case["weights"].double().cpu()
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for j, e in enumerate(ids[t].tolist()):
            gate, up = (gate_up[e] @ hidden[t]).split(inter)
            out[t] += weights[t, j] * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    return out


def _rmse_ratio(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double().cpu() - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt())


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_interpreted_kernels_match_float64(tmp_path: Path) -> None:
    cases = {name: _case(*shape, "cpu") for name, shape in CASES.items()}
    save_file({f"{n}.{k}": v for n, c in cases.items() for k, v in c.items()}, tmp_path / "cases.safetensors")
    run = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_run_moe_interpreted.py")),
         str(tmp_path / "cases.safetensors"), str(tmp_path / "out.safetensors")],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = load_file(tmp_path / "out.safetensors")
    for name, case in cases.items():
        expected = _expected(case)
        got = outputs[name]
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert _rmse_ratio(got, expected) < 1e-5, f"{name}: kernel off by {_rmse_ratio(got, expected):.2e}"
        grouped = outputs[f"{name}.grouped"]
        assert grouped.dtype == case["hidden"].dtype
        # grouped_moe casts the kernel's fp32 sum to the input dtype once: bf16 rounding only
        limit = 1e-5 if case["hidden"].dtype == torch.float32 else 5e-3
        assert _rmse_ratio(grouped, expected) < limit, f"{name}: grouped_moe off"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernels_match_float64_at_the_benchmark_shape() -> None:
    from onboardlm.kernels.moe_decode import moe_decode  # noqa: PLC0415

    for tokens in (1, 8):
        case = _case(tokens, 8, 128, 2048, 768, torch.bfloat16, "cuda")
        inter = case["gate_up"].shape[1] // 2
        w1, w3 = case["gate_up"][:, :inter], case["gate_up"][:, inter:]
        got = moe_decode(case["hidden"], case["ids"], case["weights"], w1, case["w2"], w3)
        assert _rmse_ratio(got, _expected(case)) < 1e-4
