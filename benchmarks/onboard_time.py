"""Seconds to onboard each listed architecture end to end (all phases, generated tests included).

Each type runs in a fresh process (``onboardlm onboard <type> --json``), as a user would run it, so
import time counts. Prints one line per type, the total, and the ratio to the 60 s goal (and the
20 s stretch goal); writes the table to benchmarks/results/onboard_time.json.

    .venv/bin/python benchmarks/onboard_time.py [TYPE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from onboardlm.registry.atomic import atomic_write_text

TYPES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi",
    "phi3",
    "olmo2",
    "granite",
    "starcoder2",
    "cohere",
    "smollm3",
    "stablelm",
    "internlm3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v3",
    "glm4_moe",
    "gpt_oss",
]
GOAL_S, STRETCH_S = 60.0, 20.0
RESULTS = Path(__file__).parent / "results" / "onboard_time.json"


def onboard_once(model_type: str, out_root: Path) -> dict[str, object]:
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "onboardlm.cli",
            "onboard",
            model_type,
            "--out",
            str(out_root / model_type),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        return {
            "type": model_type,
            "seconds": seconds,
            "status": f"error (exit {done.returncode})",
            "error": done.stderr.strip().splitlines()[-1:],
        }
    worst: dict[str, float] = {}
    for test in report["tests"]:
        if (
            test["metric"] is not None
            and test.get("metric_kind") == "rmse_ratio"
            and "bf16" not in test["name"]
        ):
            worst[test["level"]] = max(worst.get(test["level"], 0.0), test["metric"])  # fp32 RMSE ratios
    return {
        "type": model_type,
        "seconds": round(seconds, 2),
        "status": report["status"],
        "tests": len(report["tests"]),
        "worst_rmse_ratio": {level: float(f"{value:.3g}") for level, value in sorted(worst.items())},
        "phases": {phase["name"]: phase["seconds"] for phase in report["phases"]},
    }


def main(types: list[str]) -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in types:
            row = onboard_once(model_type, Path(tmp))
            rows.append(row)
            print(
                f"{model_type:<12} {row['seconds']:7.1f} s  {row['status']:<5} "
                f"{row['seconds'] / GOAL_S:5.2f}x of the 60 s goal  {row.get('worst_rmse_ratio', '')}",
                flush=True,
            )
    total = sum(float(row["seconds"]) for row in rows)
    passed = sum(row["status"] == "pass" for row in rows)
    slowest = max(rows, key=lambda row: float(row["seconds"]))
    print(
        f"total {total:.1f} s for {len(rows)} types ({passed} pass); mean {total / len(rows):.1f} s; "
        f"slowest {slowest['type']} {slowest['seconds']} s = {float(slowest['seconds']) / GOAL_S:.2f}x of the "
        f"goal, {float(slowest['seconds']) / STRETCH_S:.2f}x of the stretch goal"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        RESULTS,
        json.dumps(
            {
                "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
                "goal_s": GOAL_S,
                "stretch_s": STRETCH_S,
                "total_s": round(total, 1),
                "passed": passed,
                "rows": rows,
            },
            indent=2,
        )
        + "\n",
    )
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "types", nargs="*", default=TYPES, help="model types (default: the 22 generated ones)"
    )
    sys.exit(main(parser.parse_args().types))
