"""Every generated file, model and test, is as the pinned ruff formats and lints it (issue 20)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from onboardlm.onboard.generate import ruff_command

ROOT = Path(__file__).resolve().parents[2]
GENERATED = [
    *sorted((ROOT / "src/onboardlm/models/custom").glob("modeling_*.py")),
    *sorted((ROOT / "tests/models/generated").glob("test_*_modeling.py")),
]


def test_there_are_generated_files() -> None:
    assert len(GENERATED) >= 44  # 22 models and their tests


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_generated_files_pass_the_pinned_ruff(command: list[str]) -> None:
    ruff = ruff_command()
    assert ruff is not None, "ruff is a pinned dependency of onboardlm"
    config = ["--config", str(ROOT / "pyproject.toml")]
    done = subprocess.run(
        [*ruff, *command, *config, *map(str, GENERATED)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr
