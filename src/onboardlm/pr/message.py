"""PR.md: the pull request's title and body, from the onboarding report and what the PR writes."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from typing import Any

from onboardlm import __version__
from onboardlm.pr.onboarded import OnboardedModel
from onboardlm.pr.registry import RegistryPlan


def pr_title(onboarded: OnboardedModel) -> str:
    return f"[None][feat] AutoDeploy: add {onboarded.causal_lm_class} ({onboarded.model_type}) lean model"


def render_pr(
    onboarded: OnboardedModel,
    registry: RegistryPlan,
    written: Sequence[tuple[str, str]],
    test_path: str,
    notes: Sequence[str] = (),
) -> str:
    """The PR message; ``written`` is (checkout-relative path, "added" | "modified") per file."""
    report = onboarded.report
    lines = [f"# {pr_title(onboarded)}", "", "## Summary", ""]
    name = onboarded.registered_as or onboarded.model
    origin = f" (from `{onboarded.model}`)" if name != onboarded.model else ""
    lines.append(
        f"Adds a lean AutoDeploy model for `{name}`{origin} (`{onboarded.model_type}`): "
        f"`{onboarded.causal_lm_class}` on the canonical `torch.ops.auto_deploy.*` ops, with its "
        f"hierarchical equivalence tests against transformers. Generated, verified and reviewed by "
        f"onboardlm {__version__} (onboarding {str(report['status']).upper()} in {report.get('seconds', 0):.1f} s)."
    )
    lines += ["", *_facts(report, registry), *(f"- {note}" for note in notes), "", "Files:", ""]
    lines += [f"- `{path}` ({how})" for path, how in written]
    lines += ["", "## Review", "", *_review(report.get("review"))]
    lines += ["", "## Tests", "", *_tests(report.get("tests") or [])]
    lines += ["", "## Reproduce", "", "```bash", f"pytest {test_path} -v"]
    if registry.config is not None:
        lines.append(
            f"python examples/auto_deploy/build_and_run_ad.py --model {registry.name} "
            f"--args.yaml-extra examples/auto_deploy/model_registry/configs/{registry.config}"
        )
    source = report.get("source") or onboarded.model
    lines += [f"onboardlm onboard {shlex.quote(source)}  # regenerates the files and the report", "```"]
    lines += ["", *_e2e(report.get("prompts") or [])]
    not_done = report.get("not_done") or []
    if not_done:
        lines += ["", "## Not done", ""] + [f"- {item}" for item in not_done]
    return "\n".join(lines) + "\n"


def _facts(report: dict[str, Any], registry: RegistryPlan) -> list[str]:
    facts = []
    fit = report.get("fit") or {}
    if isinstance(fit.get("parameters"), int):
        facts.append(
            f"- size: {fit['parameters'] / 1e9:.3f} B parameters, world size {fit.get('world_size')}"
        )
    if report.get("text_decoder_of"):
        facts.append(f"- scope: the text decoder of {report['text_decoder_of']}")
    facts.append(f"- registry: {registry.note}")
    return facts


def _review(review: dict[str, Any] | None) -> list[str]:
    if not review:
        return ["No review recorded."]
    lines = [
        f"REVIEW RESULT: {review.get('result')}, {review.get('passed')}/{review.get('applicable')} rules passed"
    ]
    for failure in review.get("failures") or []:
        lines.append(
            f"- {failure.get('rule_id')} {failure.get('file')}:{failure.get('line')}: {failure.get('reason')}"
        )
    return lines


def _tests(tests: Sequence[dict[str, Any]]) -> list[str]:
    if not tests:
        return ["No test results recorded."]
    lines = ["| level | test | metric | tolerance | result |", "| --- | --- | ---: | ---: | --- |"]
    for test in tests:
        result = "PASS" if test.get("passed") else "FAIL"
        lines.append(
            f"| {test.get('level')} | `{test.get('name')}` | {_number(test.get('metric'))} | "
            f"{_number(test.get('tolerance'))} | {result} |"
        )
    passed = sum(bool(t.get("passed")) for t in tests)
    return [*lines, "", f"{passed}/{len(tests)} passed (metric: RMSE ratio ‖actual−expected‖/‖expected‖)."]


def _e2e(prompts: Sequence[dict[str, Any]]) -> list[str]:
    if not prompts:
        return ["## End-to-end run", "", "No end-to-end run recorded (see Not done)."]
    last = prompts[-1].get("run", "")
    runs = [p for p in prompts if p.get("run", "") == last]
    log = [f"[PROMPT {p.get('index')}] {p.get('prompt')}: {p.get('output')}" for p in runs]
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", "\n".join(log))), default=0))
    return [f"## End-to-end run ({last or 'last run'}), verbatim", "", fence, *log, fence]


def _number(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.3g}"
