"""Text rendering of a review report (the CLI only prints what this returns)."""

from __future__ import annotations

from rich.text import Text

from onboardlm.review.findings import GROUPS, ReviewReport, Status

STYLES = {Status.PASS: "green", Status.FAIL: "bold red", Status.NA: "dim"}


def render_report(report: ReviewReport) -> Text:
    """``REVIEW RESULT``, one section per rule group, ``PASSED: x/y``, then the numbered failures."""
    text = Text()
    verdict = Status.PASS if report.passed else Status.FAIL
    text.append("REVIEW RESULT: ", style="bold").append(verdict.value, style=STYLES[verdict]).append("\n")
    text.append(f"model: {report.model_file}\n")
    text.append(f"tests: {report.test_file or '(none given)'}\n")
    for group, title in GROUPS.items():
        results = [result for result in report.results if result.rule.group == group]
        if not results:
            continue
        text.append(f"\n{group} — {title}\n", style="bold")
        for result in results:
            for i, finding in enumerate(result.findings):
                label = f"  {result.rule.id:<4} " if i == 0 else " " * 7
                text.append(label).append(f"{finding.status.value:<4}", style=STYLES[finding.status])
                text.append(f"  {finding.location}  {finding.reason}\n")
    not_applicable = len(report.results) - len(report.applicable)
    text.append(f"\nPASSED: {report.num_passed}/{len(report.applicable)}", style="bold")
    text.append(f" (N/A: {not_applicable})\n" if not_applicable else "\n")
    if report.failures:
        text.append("\nFAILURES\n", style="bold red")
        for number, finding in enumerate(report.failures, start=1):
            text.append(f"{number}. [{finding.rule_id}] {finding.location} — {finding.reason}\n")
    return text
