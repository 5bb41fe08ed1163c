"""``benchmarks/serve.py``'s ``summary`` object: the keys the issue asks for, from a run's rows."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module
    spec.loader.exec_module(module)
    return module


def _rows(bench, scale: float) -> list[dict]:
    rows = []
    for concurrency in (1, 64):
        for key, tok_s, tpot in (("serve", 600, 5.2), ("transformers", 100, 80), ("static", 700, 5.0)):
            rows.append({
                "concurrency": concurrency, "system": bench.SYSTEMS[key], "requests": 8,
                "output_tok_s": tok_s * scale, "seconds": 1.0, "ttft_ms_p50": 10.0, "ttft_ms_p99": 20.0 * scale,
                "tpot_ms_p50": tpot, "tpot_ms_p99": tpot,
            })  # fmt: skip
    return rows


def test_gpu_summary_quotes_the_8b_figures_and_the_cpu_run(bench) -> None:
    summary = bench.summary("NVIDIA H200", _rows(bench, 2.0), _rows(bench, 0.1))
    assert summary["gpu"] == "NVIDIA H200"
    assert summary["throughput_c64_8b_tok_s"] == 1200
    assert summary["throughput_c64_8b_ratio_vs_hf_cb"] == pytest.approx(6.0)
    assert summary["tpot_p50_c1_8b_ms"] == 5.2
    assert summary["tpot_c1_8b_ratio_vs_static"] == pytest.approx(1.04)
    assert summary["ttft_p99_c64_8b_ms"] == 40.0
    assert summary["cpu"]["throughput_c64_tok_s"] == pytest.approx(60.0)
    assert summary["cpu"]["throughput_c64_ratio_vs_hf_cb"] == pytest.approx(6.0)
    assert summary["cpu"]["tpot_p50_c1_ms"] == 5.2


def test_cpu_summary_has_no_gpu_figures(bench) -> None:
    summary = bench.summary(None, _rows(bench, 1.0), _rows(bench, 1.0))
    assert summary["gpu"] is None and summary["throughput_c64_8b_tok_s"] is None
    assert summary["cpu"]["ttft_p99_c64_ms"] == 20.0
