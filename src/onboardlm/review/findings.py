"""Result types of the review: rules, what a rule check returns, findings and the report."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from onboardlm.review.context import ReviewContext

#: Rule groups in catalogue order, id -> title (REVIEW_RULES.md section headings).
GROUPS: dict[str, str] = {
    "B": "structure and self-containment",
    "C": "operations",
    "CA": "input contract",
    "D": "RoPE and MoE layout",
    "F": "tests",
    "G": "test levels",
    "H": "weights",
    "A": "output",
}


class Status(str, enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    NA = "N/A"


@dataclass(frozen=True)
class Flag:
    """One place a rule objects to: ``file:line`` and why."""

    file: Path
    line: int
    reason: str


@dataclass(frozen=True)
class Outcome:
    """What a rule check returns: the flags it raised, or why it passes or does not apply."""

    flags: tuple[Flag, ...] = ()
    applies: bool = True
    note: str = ""
    file: Path | None = None
    line: int | None = None

    @classmethod
    def of(cls, flags: Sequence[Flag], ok: str, file: Path | None = None, line: int | None = None) -> Outcome:
        """FAIL with ``flags`` when there are any, else PASS with ``ok`` as the reason."""
        return cls(tuple(flags), note=ok, file=file, line=line)

    @classmethod
    def not_applicable(cls, why: str) -> Outcome:
        return cls(applies=False, note=why)


Check = Callable[["ReviewContext"], Outcome]


@dataclass(frozen=True)
class Rule:
    """One catalogue rule: stable id, its group, the catalogue text and the function that checks it."""

    id: str
    group: str
    text: str
    check: Check
    needs_tests: bool = False


def rule(group: str, rule_id: str, text: str, *, needs_tests: bool = False) -> Callable[[Check], Rule]:
    """Decorator turning a check function into a :class:`Rule`."""

    def wrap(check: Check) -> Rule:
        return Rule(rule_id, group, text, check, needs_tests)

    return wrap


@dataclass(frozen=True)
class Finding:
    """One line of the report: a rule's status at ``file:line`` with a reason."""

    rule_id: str
    status: Status
    file: str | None
    line: int | None
    reason: str

    @property
    def location(self) -> str:
        if self.file is None:
            return "-"
        return f"{self.file}:{self.line}" if self.line else self.file

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule_id": self.rule_id,
            "status": self.status.value,
            "file": self.file,
            "line": self.line,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class RuleResult:
    """A rule with its findings; FAIL when any finding fails."""

    rule: Rule
    findings: tuple[Finding, ...]

    @property
    def status(self) -> Status:
        statuses = {finding.status for finding in self.findings}
        if Status.FAIL in statuses:
            return Status.FAIL
        return Status.NA if statuses == {Status.NA} else Status.PASS

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.rule.id,
            "text": self.rule.text,
            "status": self.status.value,
            "findings": [finding.to_dict() for finding in self.findings],
        }


@dataclass(frozen=True)
class ReviewReport:
    """The review of one model file (and its test file): PASS only when no applicable rule fails."""

    model_file: str
    test_file: str | None
    results: tuple[RuleResult, ...]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(result.status is not Status.FAIL for result in self.results)

    @property
    def applicable(self) -> list[RuleResult]:
        return [result for result in self.results if result.status is not Status.NA]

    @property
    def num_passed(self) -> int:
        return sum(result.status is Status.PASS for result in self.results)

    @property
    def failures(self) -> list[Finding]:
        """Every failing finding, in rule order then file order."""
        return [f for result in self.results for f in result.findings if f.status is Status.FAIL]

    def result(self, rule_id: str) -> RuleResult:
        return next(result for result in self.results if result.rule.id == rule_id)

    def to_dict(self) -> dict[str, Any]:
        groups = []
        for group, title in GROUPS.items():
            results = [result for result in self.results if result.rule.group == group]
            if results:
                groups.append(
                    {"id": group, "title": title, "rules": [result.to_dict() for result in results]}
                )
        return {
            "result": "PASS" if self.passed else "FAIL",
            "model_file": self.model_file,
            "test_file": self.test_file,
            "options": self.options,
            "passed": self.num_passed,
            "applicable": len(self.applicable),
            "groups": groups,
            "failures": [{"number": i, **f.to_dict()} for i, f in enumerate(self.failures, start=1)],
        }
