"""Numeric comparison helpers for equivalence tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RmseCheck:
    """One ``assert_rmse_close`` call as seen by an observer (ratio is inf for a shape or NaN failure)."""

    ratio: float
    tolerance: float
    passed: bool
    msg: str


_observers: list[Callable[[RmseCheck], None]] = []


@contextmanager
def observe_rmse_checks(observer: Callable[[RmseCheck], None]) -> Iterator[None]:
    """Call ``observer`` with every ``assert_rmse_close`` check made inside the ``with`` block."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


def _notify(ratio: float, tolerance: float, msg: str) -> None:
    check = RmseCheck(ratio, tolerance, ratio <= tolerance, msg)
    for observer in list(_observers):
        observer(check)


def rmse_ratio(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖₂ / ‖expected‖₂ computed in fp32 (0 when both are all zeros)."""
    a, e = actual.detach().float(), expected.detach().float()
    diff_norm = torch.linalg.vector_norm(a - e).item()
    ref_norm = torch.linalg.vector_norm(e).item()
    if ref_norm == 0.0:
        return 0.0 if diff_norm == 0.0 else float("inf")
    return diff_norm / ref_norm


def assert_rmse_close(
    actual: torch.Tensor, expected: torch.Tensor, rmse_ratio_tol: float, msg: str = ""
) -> None:
    """Assert that the relative RMS error of ``actual`` against ``expected`` is at most the tolerance.

    Unlike an element-wise ``assert_close``, a few outlier elements do not fail the check; shapes must
    match exactly and non-finite values always fail.
    """
    prefix = f"{msg}: " if msg else ""
    if actual.shape != expected.shape:
        _notify(float("inf"), rmse_ratio_tol, msg)
        raise AssertionError(f"{prefix}shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        _notify(float("inf"), rmse_ratio_tol, msg)
        raise AssertionError(f"{prefix}actual has non-finite values")
    ratio = rmse_ratio(actual, expected)
    _notify(ratio, rmse_ratio_tol, msg)
    if not ratio <= rmse_ratio_tol:
        diff_norm = torch.linalg.vector_norm(actual.float() - expected.float()).item()
        ref_norm = torch.linalg.vector_norm(expected.float()).item()
        raise AssertionError(
            f"{prefix}RMSE ratio {ratio:.3e} > tolerance {rmse_ratio_tol:.3e} "
            f"(‖actual−expected‖={diff_norm:.4e}, ‖expected‖={ref_norm:.4e})"
        )
