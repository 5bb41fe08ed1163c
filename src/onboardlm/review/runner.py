"""Run the review: parse once, run each rule on the shared context, collect findings."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from transformers import PretrainedConfig

from onboardlm.review.catalog import RULES, RULES_BY_ID
from onboardlm.review.context import ReviewContext
from onboardlm.review.findings import Finding, Outcome, ReviewReport, Rule, RuleResult, Status
from onboardlm.review.source import ReviewInputError


def review_model_file(
    model_file: str | Path,
    test_file: str | Path | None = None,
    reference: str | None = None,
    checkpoint_keys: str | Path | None = None,
    run_tests: bool = False,
    rule_ids: Collection[str] | None = None,
    config: PretrainedConfig | None = None,
) -> ReviewReport:
    """Review a lean model file (and its test file) against the rule catalogue.

    ``reference``: transformers model_type whose state dict BA1 loads (default: the config's own);
    ``checkpoint_keys``: a file of checkpoint keys to compare with instead; ``run_tests``: also run the
    test file with pytest; ``rule_ids``: only these rules (all by default); ``config``: the config being
    onboarded, whose tiny copy BA1 builds (default: the config class's defaults). Bad input raises
    :class:`ReviewInputError`.
    """
    unknown = sorted(set(rule_ids or ()) - set(RULES_BY_ID))
    if unknown:
        raise ReviewInputError(", ".join(unknown), "unknown rule id", f"known: {', '.join(RULES_BY_ID)}")
    ctx = ReviewContext.load(
        Path(model_file),
        Path(test_file) if test_file is not None else None,
        reference,
        Path(checkpoint_keys) if checkpoint_keys is not None else None,
        run_tests,
        config,
    )
    selected = [r for r in RULES if rule_ids is None or r.id in rule_ids]
    options = {
        "reference": reference,
        "checkpoint_keys": str(checkpoint_keys) if checkpoint_keys is not None else None,
        "run_tests": run_tests,
    }
    return ReviewReport(
        model_file=str(model_file),
        test_file=str(test_file) if test_file is not None else None,
        results=tuple(_run(rule, ctx) for rule in selected),
        options=options,
    )


def _run(rule: Rule, ctx: ReviewContext) -> RuleResult:
    if rule.needs_tests and ctx.tests is None:
        missing = Finding(
            rule.id, Status.FAIL, None, None, "no test file given (--test-file): the rule cannot hold"
        )
        return RuleResult(rule, (missing,))
    outcome = rule.check(ctx)
    default_file = ctx.tests.src.path if rule.needs_tests and ctx.tests is not None else ctx.src.path
    return RuleResult(rule, _findings(rule, outcome, default_file))


def _findings(rule: Rule, outcome: Outcome, default_file: Path) -> tuple[Finding, ...]:
    if not outcome.applies:
        return (Finding(rule.id, Status.NA, None, None, outcome.note),)
    if not outcome.flags:
        file = outcome.file or default_file
        return (Finding(rule.id, Status.PASS, str(file), outcome.line, outcome.note),)
    unique = dict.fromkeys((str(f.file), f.line, f.reason) for f in outcome.flags)
    ordered = sorted(unique, key=lambda item: (item[0], item[1]))
    return tuple(Finding(rule.id, Status.FAIL, file, line, reason) for file, line, reason in ordered)
