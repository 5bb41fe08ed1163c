"""``--run-tests``: run the test file with pytest in a subprocess and read per-test outcomes (JUnit XML)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

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
    """Run ``pytest test_file`` and collect which test functions failed, were skipped or passed."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider"]
        command += [f"--junitxml={report}", "-o", "junit_family=xunit2"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return TestRun(False, f"pytest did not finish within {timeout:.0f} s")
        last_line = (done.stdout.strip().splitlines() or ["no output"])[-1]
        if done.returncode not in (0, 1) or not report.exists():
            return TestRun(False, f"pytest exited with code {done.returncode}: {last_line}")
        return _read_junit(report, last_line)


def _read_junit(report: Path, summary: str) -> TestRun:
    failed: dict[str, str] = {}
    skipped: dict[str, str] = {}
    seen: set[str] = set()
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name", "").split("[", 1)[0]
        seen.add(name)
        for child in case:
            message = (child.get("message") or child.tag).splitlines()[0][:200]
            if child.tag in ("failure", "error"):
                failed.setdefault(name, message)
            elif child.tag == "skipped":
                skipped.setdefault(name, message)
    return TestRun(True, summary, failed, skipped, frozenset(seen - set(failed) - set(skipped)))
