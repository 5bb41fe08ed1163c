"""Record one pytest run of scripts/compat.sh in docs/compat.json, or render docs/compat.md from it.

compat_record.py RESULTS VERSION SUITE SECONDS LOG   # add the counts of LOG's closing line
compat_record.py --render RESULTS MARKDOWN           # one row per transformers release
"""

from __future__ import annotations

import datetime
import json
import platform
import re
import sys
from pathlib import Path

OUTCOMES = ("passed", "failed", "errors", "skipped", "xfailed", "xpassed")


def counts(log: str) -> dict[str, int]:
    """The counts of pytest's closing line (``3 failed, 120 passed, 2 skipped in 50.1s``)."""
    closing = next(line for line in reversed(log.splitlines()) if re.search(r" in [\d.]+s", line))
    found = {{"error": "errors"}.get(word, word): int(n) for n, word in re.findall(r"(\d+) (\w+)", closing)}
    return {outcome: found.get(outcome, 0) for outcome in OUTCOMES}


def not_passed(log: str) -> dict[str, int]:
    """Failed or erroring tests per test file, from pytest's short summary (``FAILED path::test - ...``)."""
    found: dict[str, int] = {}
    for path in re.findall(r"^(?:FAILED|ERROR) ([^:\s]+)", log, flags=re.MULTILINE):
        found[path] = found.get(path, 0) + 1
    return dict(sorted(found.items()))


def record(results: Path, version: str, suite: str, seconds: str, log: Path) -> None:
    data = json.loads(results.read_text()) if results.exists() else {}
    import torch  # the venv's own versions, recorded beside the counts

    entry = data.setdefault(version, {"suites": {}})
    entry.update(
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        python=platform.python_version(),
    )
    text = log.read_text()
    entry["suites"][suite] = {**counts(text), "seconds": int(seconds), "not_passed": not_passed(text)}
    results.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def render(results: Path, markdown: Path) -> None:
    data = json.loads(results.read_text())
    suites = sorted({suite for entry in data.values() for suite in entry["suites"]})
    lines = [
        "# transformers compatibility",
        "",
        "`scripts/compat.sh VERSION...` runs these suites on each transformers release in a venv of its own",
        "(every other package at its `constraints.txt` version) and rewrites this page from `docs/compat.json`.",
        "",
        "| transformers | torch | date | " + " | ".join(f"`{s}`" for s in suites) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in suites) + " |",
    ]
    for version in sorted(data, key=lambda v: tuple(int(p) for p in v.split("."))):
        entry = data[version]
        cells = []
        for suite in suites:
            c = entry["suites"].get(suite)
            if c is None:
                cells.append("not run")
                continue
            parts = [f"{c[o]} {o}" for o in OUTCOMES if c[o] or o in ("passed", "failed")]
            cells.append(", ".join(parts) + f" ({c['seconds']} s)")
        lines.append(f"| {version} | {entry['torch']} | {entry['date']} | " + " | ".join(cells) + " |")
    details = [
        f"- transformers {version}: " + ", ".join(f"`{path}` ({n})" for path, n in files.items())
        for version in sorted(data, key=lambda v: tuple(int(p) for p in v.split(".")))
        if (
            files := {
                p: n for s in data[version]["suites"].values() for p, n in s.get("not_passed", {}).items()
            }
        )
    ]
    if details:
        lines += ["", "Failed or erroring tests, per file:", "", *details]
    markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "--render":
        render(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        record(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5]))
