"""Pytest plugin that records the numbers behind every equivalence check and writes them as JSON.

Load it with ``-p onboardlm.testing.pytest_plugin`` and name the output with ``--onboardlm-metrics
PATH`` (or the ``ONBOARDLM_METRICS`` environment variable); without either it does nothing. While a
test runs, every ``assert_rmse_close`` (its RMSE ratio and tolerance) and every
``torch.testing.assert_close`` (its max absolute error, rtol and atol) is recorded, pass or fail.

JSON layout: ``{"exitstatus": int, "errors": [str], "tests": [{"nodeid", "name", "outcome",
"seconds", "message", "checks": [{"kind": "rmse" | "close", "metric", "tolerance", "rtol", "passed",
"msg"}]}]}``; ``errors`` holds collection errors; ``tolerance`` is the RMSE tolerance or the atol.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from onboardlm.registry.atomic import atomic_write_text
from onboardlm.testing.metrics import RmseCheck, observe_rmse_checks

OPTION = "--onboardlm-metrics"
ENV_VAR = "ONBOARDLM_METRICS"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        OPTION, default=None, help=f"write per-test equivalence metrics as JSON to this file (or ${ENV_VAR})"
    )


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption(OPTION) or os.environ.get(ENV_VAR)
    if path:
        config.pluginmanager.register(MetricsRecorder(Path(path)), "onboardlm-metrics-recorder")


def _max_abs_error(actual: Any, expected: Any) -> float:
    """Largest |actual − expected| over matching tensors (nested sequences too); inf if they differ."""
    if isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor):
        if actual.shape != expected.shape:
            return math.inf
        if actual.numel() == 0:
            return 0.0
        diff = (actual.detach().double() - expected.detach().double()).abs()
        return diff.nan_to_num(nan=math.inf).max().item()
    if isinstance(actual, Sequence) and isinstance(expected, Sequence) and not isinstance(actual, str):
        if len(actual) != len(expected):
            return math.inf
        return max((_max_abs_error(a, e) for a, e in zip(actual, expected, strict=True)), default=0.0)
    return 0.0 if actual == expected else math.inf


def _finite_or_none(value: float | None) -> float | None:
    """JSON has no inf/NaN: such values become None (the check's ``passed`` says it failed)."""
    return value if value is not None and math.isfinite(value) else None


class MetricsRecorder:
    """Collects checks per test and writes the JSON file at the end of the session."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tests: dict[str, dict[str, Any]] = {}
        self.errors: list[str] = []
        self._checks: list[dict[str, Any]] = []

    def _entry(self, item_or_report: Any) -> dict[str, Any]:
        nodeid = item_or_report.nodeid
        return self.tests.setdefault(
            nodeid,
            {
                "nodeid": nodeid,
                "name": nodeid.rpartition("::")[2],
                "outcome": "not run",
                "seconds": 0.0,
                "message": "",
                "checks": [],
            },
        )

    def _record_rmse(self, check: RmseCheck) -> None:
        self._checks.append(
            {
                "kind": "rmse",
                "metric": _finite_or_none(check.ratio),
                "tolerance": check.tolerance,
                "rtol": None,
                "passed": check.passed,
                "msg": check.msg,
            }
        )

    def _recording_assert_close(self, original: Callable[..., None]) -> Callable[..., None]:
        def assert_close(actual: Any, expected: Any, *args: Any, **kwargs: Any) -> None:
            passed = False
            try:
                original(actual, expected, *args, **kwargs)
                passed = True
            finally:
                self._checks.append(
                    {
                        "kind": "close",
                        "metric": _finite_or_none(_max_abs_error(actual, expected)),
                        "tolerance": kwargs.get("atol"),
                        "rtol": kwargs.get("rtol"),
                        "passed": passed,
                        "msg": str(kwargs.get("msg") or ""),
                    }
                )

        return assert_close

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        self._checks = []
        original = torch.testing.assert_close
        torch.testing.assert_close = self._recording_assert_close(original)
        try:
            with observe_rmse_checks(self._record_rmse):
                return (yield)
        finally:
            torch.testing.assert_close = original
            self._entry(item)["checks"] = self._checks

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self._entry(report)
        entry["seconds"] += report.duration
        if report.when == "call" or report.outcome != "passed":
            outcome = "error" if report.when != "call" and report.failed else report.outcome
            if entry["outcome"] in ("not run", "passed"):
                entry["outcome"] = outcome
            if report.failed or report.skipped:
                entry["message"] = entry["message"] or _message(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.errors.append(f"{report.nodeid or 'collection'}: {_message(report)}")

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        data = {"exitstatus": int(exitstatus), "errors": self.errors, "tests": list(self.tests.values())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(data, indent=1))


def _message(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The failure's one-line reason (the exception message), or the skip reason."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # skipped: (file, line, reason)
        return str(longrepr[2])
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message)
    text = str(longrepr or "").strip().splitlines()
    return text[-1] if text else ""
