"""The tested transformers range: the warning line, and one range in pyproject.toml and the code."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version
from typer.testing import CliRunner

from onboardlm import compat
from onboardlm.cli import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("installed", ["5.17.0", "5.21.1", "5.25.0", "5.25.3"])
def test_tested_releases_give_no_warning(installed: str) -> None:
    assert compat.transformers_range_warning(installed) is None


@pytest.mark.parametrize("installed", ["5.16.1", "4.57.6", "5.26.0", "6.0.0"])
def test_untested_releases_give_one_line_that_says_what_to_install(installed: str) -> None:
    warning = compat.transformers_range_warning(installed)
    assert warning is not None and "\n" not in warning
    assert f"transformers {installed} is outside the range" in warning
    assert 'pip install "transformers>=5.17.0,<5.26"' in warning


def test_the_cli_prints_the_warning_once_before_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "version", lambda name: "5.30.0")
    result = CliRunner().invoke(app, ["ops", "--json"])
    assert result.exit_code == 0
    assert result.stderr.count("warning: transformers 5.30.0 is outside the range") == 1
    assert "warning" not in result.stdout  # the JSON on stdout stays parseable


def test_pyproject_declares_the_tested_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirement = next(Requirement(d) for d in project["dependencies"] if d.startswith("transformers"))
    highest = compat.TESTED_TRANSFORMERS_HIGHEST
    assert requirement.specifier.contains(str(compat.TESTED_TRANSFORMERS_LOWEST))
    assert requirement.specifier.contains(f"{highest.major}.{highest.minor}.9")
    assert not requirement.specifier.contains(f"{highest.major}.{highest.minor + 1}.0")
    assert not requirement.specifier.contains("5.16.1")


def test_the_pinned_release_is_in_the_tested_range() -> None:
    pins = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line
    )
    assert compat.transformers_range_warning(pins["transformers"]) is None
    # shipped files are generated on the pinned release; tests treat it as the highest tested one
    assert Version(pins["transformers"]) == compat.TESTED_TRANSFORMERS_HIGHEST
    assert Version(pins["transformers"]) >= compat.TESTED_TRANSFORMERS_LOWEST
