"""Phase 6b: run a generated test file and report, per test, its level, metric, tolerance and outcome.

The file runs with pytest in a subprocess (single process, no cache, rootdir and conftest lookup
limited to the test's folder, no bytecode written) with ``onboardlm.testing.pytest_plugin``, which
records every RMSE ratio and max absolute error. The level of a test comes from its name prefix
(``test_block_``, ``test_layer_``, ``test_model_``, ``test_export_``; anything else is "other").
Nothing escapes as an exception: a missing file, a crash of pytest or a timeout gives a report that
says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onboardlm.testing.pytest_plugin import OPTION

__all__ = ["LEVELS", "TestReport", "TestResult", "verify"]

LEVELS = ("block", "layer", "model", "export")
TAIL_CHARS = 4000


@dataclass(frozen=True)
class TestResult:
    """One test (one parametrized case). ``metric`` is the check closest to its tolerance:
    an RMSE ratio (``metric_kind="rmse_ratio"``) or a max absolute error (``"max_abs_error"``, with
    ``tolerance`` = atol); None when the test made no numeric check or the value was not finite."""

    __test__ = False  # not a pytest class

    level: str
    name: str
    passed: bool
    outcome: str
    metric_kind: str | None = None
    metric: float | None = None
    tolerance: float | None = None
    message: str = ""


@dataclass(frozen=True)
class TestReport:
    """Outcome of running one test file."""

    __test__ = False

    test_file: Path
    passed: bool
    seconds: float
    tests: tuple[TestResult, ...] = ()
    reason: str = ""  # why the run itself failed (missing file, crash, timeout, collection error)
    output_tail: str = ""  # the end of pytest's output, when something failed
    levels: dict[str, bool] = field(default_factory=dict)  # level -> all its tests passed

    @property
    def failed(self) -> list[TestResult]:
        return [test for test in self.tests if not test.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "test_file": str(self.test_file),
            "passed": self.passed,
            "seconds": round(self.seconds, 3),
            "levels": self.levels,
            "reason": self.reason,
            "output_tail": self.output_tail,
            "tests": [vars(test) for test in self.tests],
        }


def level_of(name: str) -> str:
    """The test level from the test function's name prefix."""
    for level in LEVELS:
        if name.startswith(f"test_{level}_"):
            return level
    return "other"


def _closest_check(checks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A failed check first, else the one with the largest metric / tolerance."""
    if not checks:
        return None

    def badness(check: dict[str, Any]) -> tuple[bool, float]:
        metric, tol = check["metric"], check["tolerance"]
        if metric is None:
            return (not check["passed"], float("inf"))
        return (not check["passed"], metric / tol if tol else metric)

    return max(checks, key=badness)


def _result(entry: dict[str, Any]) -> TestResult:
    check = _closest_check(entry["checks"])
    kind = None if check is None else ("rmse_ratio" if check["kind"] == "rmse" else "max_abs_error")
    return TestResult(
        level=level_of(entry["name"]),
        name=entry["name"],
        passed=entry["outcome"] == "passed",
        outcome=entry["outcome"],
        metric_kind=kind,
        metric=None if check is None else check["metric"],
        tolerance=None if check is None else check["tolerance"],
        message=entry["message"],
    )


def _tail(text: str) -> str:
    return text[-TAIL_CHARS:]


def _environment(pythonpath: Path | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTEST_ADDOPTS", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(pythonpath).resolve()), env.get("PYTHONPATH")])
        )
    return env


def verify(test_file: Path, *, pythonpath: Path | None = None, timeout_s: float = 600.0) -> TestReport:
    """Run ``test_file`` with pytest and return what each test measured; never raises for bad input."""
    test_file = Path(test_file)
    start = time.monotonic()
    if not test_file.is_file():
        return TestReport(test_file, False, 0.0, reason=f"{test_file}: no such test file")
    folder = test_file.resolve().parent
    with tempfile.TemporaryDirectory(prefix="onboardlm-verify-") as tmp:
        metrics = Path(tmp) / "metrics.json"
        command = [
            sys.executable,
            "-m",
            "pytest",
            str(test_file.resolve()),
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "onboardlm.testing.pytest_plugin",
            f"{OPTION}={metrics}",
            f"--rootdir={folder}",
            f"--confcutdir={folder}",
        ]
        try:
            done = subprocess.run(
                command,
                cwd=folder,
                env=_environment(pythonpath),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            output = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            return TestReport(
                test_file,
                False,
                time.monotonic() - start,
                reason=f"pytest did not finish within {timeout_s:g} s",
                output_tail=_tail(output),
            )
        except OSError as err:
            return TestReport(test_file, False, time.monotonic() - start, reason=f"cannot run pytest: {err}")
        seconds = time.monotonic() - start
        output = done.stdout + done.stderr
        return _report(test_file, done.returncode, output, metrics, seconds)


def _report(test_file: Path, returncode: int, output: str, metrics: Path, seconds: float) -> TestReport:
    try:
        data = json.loads(metrics.read_text())
    except (OSError, ValueError):
        return TestReport(
            test_file,
            False,
            seconds,
            reason=f"pytest exited with code {returncode} without writing metrics",
            output_tail=_tail(output),
        )
    tests = tuple(_result(entry) for entry in data["tests"])
    levels: dict[str, bool] = {}
    for test in tests:
        levels[test.level] = levels.get(test.level, True) and test.passed
    reason = ""
    if data["errors"]:
        reason = "collection failed: " + "; ".join(data["errors"])
    elif not tests:
        reason = "no tests were collected"
    elif returncode not in (0, 1):
        reason = f"pytest exited with code {returncode}"
    passed = returncode == 0 and not reason and all(test.passed for test in tests)
    return TestReport(
        test_file,
        passed,
        seconds,
        tests,
        reason=reason,
        output_tail="" if passed else _tail(output),
        levels=levels,
    )
