"""How the benchmarks time things; every figure is a median with its spread (the interquartile range).

A kernel or a single forward pass (matmul, copy, prefill, one MLA decode step): ``triton.testing.do_bench``
on CUDA (warm-up, L2 flushed before each run, CUDA events), ``torch.utils.benchmark.Timer``'s
``blocked_autorange`` on the CPU (warm-up, as many runs as fit ``min_run_s``, this process's thread
count). A whole run (a ``generate`` call, a decode loop of many steps) is timed as one wall-clock
interval, the device synchronised on both ends, ``repeats`` times.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.benchmark import Timer


@dataclass(frozen=True)
class Timing:
    """Milliseconds: the median of ``runs`` measurements and their interquartile range."""

    median_ms: float
    iqr_ms: float
    runs: int

    @classmethod
    def of(cls, times_ms: list[float]) -> Timing:
        if len(times_ms) < 2:
            return cls(times_ms[0], 0.0, len(times_ms))
        q1, median, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
        return cls(median, q3 - q1, len(times_ms))


def kernel_timing(fn: Callable[[], object], device: str, min_run_s: float = 0.5) -> Timing:
    """``fn`` (a kernel or one forward pass) on ``device``: do_bench on CUDA, Timer on the CPU."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench  # noqa: PLC0415  (CUDA builds of torch bring triton)

        return Timing.of(do_bench(fn, warmup=min_run_s * 200, rep=min_run_s * 1e3, return_mode="all"))
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measured = timer.blocked_autorange(min_run_time=min_run_s)
    return Timing(measured.median * 1e3, measured.iqr * 1e3, len(measured.times))


def elapsed_ms(fn: Callable[[], object]) -> float:
    """Wall milliseconds of one call of ``fn`` (a whole run), the device synchronised on both ends."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1e3


def run_timing(fn: Callable[[], object], repeats: int) -> Timing:
    """``repeats`` wall-clock runs of ``fn`` (the caller has warmed it up)."""
    return Timing.of([elapsed_ms(fn) for _ in range(repeats)])
