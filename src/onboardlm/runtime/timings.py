"""Where the time of one ``onboardlm run`` goes: load, export, warm-up, first token, decode."""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil
import torch


def process_age_s() -> float:
    """Seconds since this process started (the interpreter, imports and argument parsing so far)."""
    return time.time() - psutil.Process().create_time()


def synchronized_clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work is done (a phase boundary)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class DecodeTimings:
    """Seconds to each batch's first token and in the decode steps after it, summed over batches."""

    first_token_s: float = 0.0
    first_token_batches: int = 0
    decode_s: float = 0.0
    decode_tokens: int = 0  # sequences x steps after the first token (rows the decode steps computed)

    def add_batch(self, first_token_s: float, decode_s: float, decode_tokens: int) -> None:
        self.first_token_s += first_token_s
        self.first_token_batches += 1
        self.decode_s += decode_s
        self.decode_tokens += decode_tokens


@dataclass
class RunTimings:
    """One run's phases. ``warm_up_s`` is the fast path's compilation and CUDA-graph capture for the
    batch sizes the run uses (none on the CPU); decode tokens/s counts only the steps after each
    batch's first token, so it compares with a benchmark's steady-state decode rate. ``start_up_s``, where
    the command line sets it, is the time from the process's start to the start of loading."""

    load_s: float
    export_s: float
    warm_up_s: float = 0.0
    decode: DecodeTimings | None = None
    start_up_s: float | None = None

    def summary(self) -> str:
        """One line: ``[start-up 4.0 s, ]load 6.1 s, export 3.0 s, warm-up 0.0 s, first token 0.42 s,
        decode 21.5 tok/s``."""
        parts = [] if self.start_up_s is None else [f"start-up {self.start_up_s:.1f} s"]
        parts += [
            f"load {self.load_s:.1f} s",
            f"export {self.export_s:.1f} s",
            f"warm-up {self.warm_up_s:.1f} s",
        ]
        if self.decode is not None and self.decode.first_token_batches:
            first = self.decode.first_token_s / self.decode.first_token_batches
            parts.append(
                f"first token {first:.2f} s"
                + (" (mean per batch)" if self.decode.first_token_batches > 1 else "")
            )
            if self.decode.decode_tokens and self.decode.decode_s > 0:
                parts.append(f"decode {self.decode.decode_tokens / self.decode.decode_s:.1f} tok/s")
        return ", ".join(parts)
