"""What the ``onboardlm pr`` tests share: the skeleton checkout and onboarding output of
:mod:`onboardlm.testing.trtllm_skeleton` (with the repository's generated Llama test), and the CLI call."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from onboardlm.cli import app
from onboardlm.testing import trtllm_skeleton
from onboardlm.testing.trtllm_skeleton import GIT_ENV, HUB_ID, MODELS_YAML, PROMPTS, TESTS, git, make_checkout

GENERATED_TEST = Path(__file__).parents[1] / "models" / "generated" / "test_llama_modeling.py"

__all__ = [
    "GIT_ENV",
    "HUB_ID",
    "MODELS_YAML",
    "PROMPTS",
    "TESTS",
    "git",
    "make_checkout",
    "run_pr",
    "write_onboarding",
]


def write_onboarding(out: Path, status: str = "pass") -> Path:
    return trtllm_skeleton.write_onboarding(out, GENERATED_TEST.read_text(), status)


def run_pr(*args: str) -> tuple[int, str]:
    """``onboardlm pr ARGS`` in-process: exit code and output."""
    result = CliRunner().invoke(app, ["pr", *args])
    return result.exit_code, result.output
