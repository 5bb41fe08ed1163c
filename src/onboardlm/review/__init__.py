"""Independent review of a lean model file and its tests against the rule catalogue (REVIEW_RULES.md).

Each rule is one function with its id and catalogue text (``catalog.RULES``); static rules read the
syntax tree, BA1 builds and loads the model, ``--run-tests`` runs the test file.
"""

from onboardlm.review.catalog import RULES, RULES_BY_ID
from onboardlm.review.findings import Finding, ReviewReport, Rule, RuleResult, Status
from onboardlm.review.render import render_report
from onboardlm.review.runner import review_model_file
from onboardlm.review.source import ReviewInputError

__all__ = [
    "RULES",
    "RULES_BY_ID",
    "Finding",
    "ReviewInputError",
    "ReviewReport",
    "Rule",
    "RuleResult",
    "Status",
    "render_report",
    "review_model_file",
]
