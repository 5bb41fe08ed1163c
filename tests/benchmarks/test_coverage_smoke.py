"""``benchmarks/coverage.py`` on one type of each kind: a pass (llama), an encoder-only model refused by
resolve (bert) and a named unsupported feature (dbrx: transformers cannot build its default config),
each as a bare model_type and as a tiny config in a directory; then a rerun resumes (skips all three).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "coverage.py"
EXPECTED = {"llama": "pass", "bert": "refused", "dbrx": "unsupported"}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_coverage_subset_records_each_kind_and_resumes(tmp_path: Path) -> None:
    out, doc = tmp_path / "coverage.json", tmp_path / "coverage.md"
    doc.write_text(
        "# intro kept\n\n<!-- coverage:start -->\nold table\n<!-- coverage:end -->\n\nafter kept\n"
    )
    done = _run("--types", ",".join(EXPECTED), "--out", str(out), "--doc", str(doc), "--timeout", "240")
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["done"] == 3 and not data["complete"]
    for model_type, verdict in EXPECTED.items():
        row = data["types"][model_type]
        for variant in ("bare", "tiny"):
            outcome = row[variant]
            assert outcome["verdict"] == verdict, (model_type, variant, outcome)
            assert outcome["seconds"] > 0
            if verdict != "pass":
                assert outcome["phase"] and outcome["reason"] and "\n" not in outcome["reason"]
    assert data["types"]["bert"]["bare"]["reason"].startswith("bert: bert is an encoder-only model")
    assert "unsupported feature" in data["types"]["dbrx"]["tiny"]["reason"]
    assert set(data["types"]["llama"]["tiny"]["worst_rmse"]) >= {"model"}
    assert data["counts"]["bare"]["pass"] == data["counts"]["tiny"]["pass"] == 1

    text = doc.read_text()
    assert text.startswith("# intro kept") and text.rstrip().endswith("after kept")
    assert "old table" not in text and "| llama | pass | pass |" in text

    again = _run("--types", ",".join(EXPECTED), "--out", str(out), "--doc", str(doc))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 type(s) to onboard, 3 already in" in again.stdout
    assert json.loads(out.read_text())["types"] == data["types"]
