"""A listing of the canonical ops with their registered schemas (for ``onboardlm ops``)."""

from __future__ import annotations

from dataclasses import dataclass

import onboardlm.ops  # noqa: F401  (registers the ops)
from onboardlm.ops._library import DECLARED_OPS, FOREIGN_OPS, get_op


@dataclass(frozen=True)
class OpEntry:
    category: str
    name: str
    signature: str
    provider: str


def op_catalog() -> list[OpEntry]:
    """Every declared op with the schema torch holds for it, grouped by category."""
    entries = []
    for name, category in DECLARED_OPS.items():
        schema = get_op(name).default._schema
        signature = str(schema).split("::", 1)[1]
        provider = "pre-registered elsewhere" if name in FOREIGN_OPS else "onboardlm"
        entries.append(OpEntry(category, name, signature, provider))
    return sorted(entries, key=lambda e: (e.category, e.name))
