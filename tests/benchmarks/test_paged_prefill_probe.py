"""``benchmarks/paged_prefill_probe.py --tiny``: the probe's steps, paths and JSON, on the CPU interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "paged_prefill_probe.py"


def test_tiny_probe_agrees_with_sdpa_and_writes_every_path(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "paged_prefill_probe.json").read_text())
    assert results["default_config"] in results["configs"]
    assert set(results["steps"]) == {"1x40", "24+19+3dec@20"}
    for step in results["steps"].values():
        for path in ["old", *results["configs"]]:
            assert step[path]["max_abs_diff"] < 0.01 and step[path]["ms"] > 0, path
