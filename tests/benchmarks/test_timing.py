"""``benchmarks/timing.py``: medians and interquartile ranges, the CPU timer and whole-run repeats."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType


def load_timing() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "timing.py"
    spec = importlib.util.spec_from_file_location("bench_timing", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


timing = load_timing()


def test_median_and_interquartile_range() -> None:
    assert timing.Timing.of([5.0, 1.0, 4.0, 2.0, 3.0]) == timing.Timing(3.0, 2.0, 5)  # quartiles 2 and 4
    assert timing.Timing.of([7.0]) == timing.Timing(7.0, 0.0, 1)


def test_cpu_kernel_timing_measures_the_call() -> None:
    measured = timing.kernel_timing(lambda: time.sleep(0.002), "cpu", min_run_s=0.1)
    assert measured.runs >= 2 and 2.0 <= measured.median_ms < 50.0  # a sleep never ends early


def test_run_timing_repeats_whole_runs() -> None:
    calls: list[int] = []
    measured = timing.run_timing(lambda: (calls.append(1), time.sleep(0.01)), repeats=3)
    assert len(calls) == 3 and measured.runs == 3 and measured.median_ms >= 10.0
