"""``--run-tests``: run the test file as the verify phase does and read per-test outcomes from its report."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from onboardlm.onboard.verify import verify

TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class TestRun:
    """Outcome per test function (parametrized cases merged: one failing case fails the function)."""

    __test__ = False  # not a pytest class

    ran: bool
    summary: str
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    passed: frozenset[str] = frozenset()


def run_pytest(test_file: Path, timeout: float = TIMEOUT_S) -> TestRun:
    """Run ``pytest test_file`` (through :func:`onboardlm.onboard.verify.verify`, which reads the
    metrics plugin's JSON) and collect which test functions failed, were skipped or passed."""
    report = verify(test_file, timeout_s=timeout)
    if report.reason:
        return TestRun(False, report.reason)
    failed: dict[str, str] = {}
    skipped: dict[str, str] = {}
    seen: set[str] = set()
    for test in report.tests:
        name = test.name.split("[", 1)[0]
        seen.add(name)
        message = (test.message or test.outcome).splitlines()[0][:200]
        if test.outcome == "skipped":
            skipped.setdefault(name, message)
        elif not test.passed:
            failed.setdefault(name, message)
    counts = Counter(test.outcome for test in report.tests)
    summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
    return TestRun(True, summary, failed, skipped, frozenset(seen - set(failed) - set(skipped)))
