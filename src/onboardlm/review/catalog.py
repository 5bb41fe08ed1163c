"""The registry of review rules, in catalogue order (REVIEW_RULES.md)."""

from __future__ import annotations

from onboardlm.review import (
    contract,
    operations,
    output,
    rope_moe,
    sharding_hints,
    structure,
    tests_rules,
    weights,
)
from onboardlm.review.findings import Rule

RULES: tuple[Rule, ...] = (
    *structure.RULES,
    *operations.RULES,
    *sharding_hints.RULES,
    *contract.RULES,
    *rope_moe.RULES,
    *tests_rules.RULES,
    *weights.RULES,
    *output.RULES,
)
RULES_BY_ID: dict[str, Rule] = {r.id: r for r in RULES}
