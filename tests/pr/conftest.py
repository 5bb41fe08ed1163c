"""Fixtures of the ``onboardlm pr`` tests: an onboarding output of the shipped Llama and a skeleton checkout."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # pr_support, for the test modules too
from pr_support import GIT_ENV, make_checkout, write_onboarding  # noqa: E402


@pytest.fixture(scope="session")
def onboarding_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_onboarding(tmp_path_factory.mktemp("onboarded") / "Llama-3.2-1B-Instruct")


@pytest.fixture
def onboarded(onboarding_template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(onboarding_template, tmp_path / "onboarded"))


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    root = tmp_path / "TensorRT-LLM"
    root.mkdir()
    return make_checkout(root)
