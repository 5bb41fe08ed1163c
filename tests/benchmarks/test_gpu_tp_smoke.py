"""``benchmarks/gpu_tp.py --smoke``: two gloo ranks on the CPU run the TP benchmark's code paths end to end.

The GPU run (NCCL, 8B shape) needs two GPUs; this keeps its script working in CI. TP=2 must give TP=1's
logits (fp32) and greedy tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_tp.py"


def test_two_rank_smoke_run_matches_one_rank(tmp_path: Path, torchrun_two_ranks: list[str]) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [*torchrun_two_ranks, str(SCRIPT), "--smoke"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_tp_cpu-smoke.json").read_text())
    assert result["world_size"] == 2
    assert result["logits_rmse_ratio"] < 1e-4
    assert result["greedy_first_divergence"] is None
    for side in ("tp1", "tp2"):
        assert all(result[side][f"decode_bs{b}"]["tok_s"] > 0 for b in result["batches"])
