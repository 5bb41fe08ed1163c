"""Shared setup for the review tests: the reference files and edited copies of them."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import pytest

from onboardlm.review import ReviewReport, Status, review_model_file

HERE = Path(__file__).parent
REPO = HERE.parents[1]


@dataclass(frozen=True)
class Files:
    """The golden Llama and the MoE fixture, each with its test file."""

    llama: Path = REPO / "src/onboardlm/models/custom/modeling_llama.py"
    llama_tests: Path = REPO / "tests/models/test_llama_modeling.py"
    moe: Path = HERE / "data/modeling_qwen3_moe_alt.py"
    moe_tests: Path = HERE / "data/qwen3_moe_alt_tests.py"


@dataclass(frozen=True)
class Edited:
    """An edited copy of a file and its text."""

    path: Path
    text: str

    def line_of(self, marker: str) -> int:
        """The 1-based line on which the first occurrence of ``marker`` starts."""
        assert marker in self.text, f"{marker!r} is not in {self.path.name}"
        return self.text[: self.text.index(marker)].count("\n") + 1


Edit = Callable[..., Edited]


@pytest.fixture(scope="session")
def files() -> Files:
    return Files()


@pytest.fixture
def edit(tmp_path: Path) -> Edit:
    """``edit(source, (old, new), ..., name=...)``: a copy of ``source`` with every ``old`` replaced."""

    def make(source: Path, *replacements: tuple[str, str], name: str | None = None) -> Edited:
        text = source.read_text(encoding="utf-8")
        for old, new in replacements:
            assert old in text, f"{old!r} is not in {source.name}"
            text = text.replace(old, new)
        path = tmp_path / (name or source.name)
        path.write_text(text, encoding="utf-8")
        return Edited(path, text)

    return make


def failing_lines(report: ReviewReport, rule_id: str) -> list[int | None]:
    return [f.line for f in report.result(rule_id).findings if f.status is Status.FAIL]


@pytest.fixture
def review_rule() -> Callable[..., ReviewReport]:
    """``review_rule(rule_id, model, tests=None, **options)``: run the given rules only."""

    def run(
        rule_ids: str | Collection[str], model: Path, tests: Path | None = None, **options: object
    ) -> ReviewReport:
        ids = {rule_ids} if isinstance(rule_ids, str) else set(rule_ids)
        return review_model_file(model, tests, rule_ids=ids, **options)  # type: ignore[arg-type]

    return run


@pytest.fixture
def lines_failed() -> Callable[[ReviewReport, str], list[int | None]]:
    return failing_lines
