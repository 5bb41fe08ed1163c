"""The support-matrix row of an onboarded model (seed 002 phase 10), when the checkout has the matrix.

``docs/source/models/supported-models.md``: one row ``| `<Class>` [^N] | <model> | `<hub id>` |`` in the
first table, placed alphabetically by class name, padded like the header, with the footnote that the
file already uses for AutoDeploy-only models. A class already listed keeps its row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from onboardlm.pr.layout import TrtllmCheckout
from onboardlm.pr.onboarded import OnboardedModel

MATRIX = Path("docs/source/models/supported-models.md")
_AD_FOOTNOTE = re.compile(r"^\[\^(\w+)\]: Supported via the \[AutoDeploy\]", re.MULTILINE)
_ARCHITECTURE = re.compile(r"^\|\s*`([^`]+)`")


@dataclass(frozen=True)
class MatrixPlan:
    note: str
    files: dict[Path, str] = field(default_factory=dict)


def plan_support_matrix(checkout: TrtllmCheckout, onboarded: OnboardedModel) -> MatrixPlan:
    path = checkout.root / MATRIX
    if not path.is_file():
        return MatrixPlan(f"no {MATRIX} in this checkout (no support-matrix row)")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    table = _first_table(lines)
    if table is None:
        return MatrixPlan(f"{MATRIX} has no table (no support-matrix row)")
    start, end = table
    rows = range(start + 2, end)
    name = onboarded.causal_lm_class
    if any((m := _ARCHITECTURE.match(lines[i])) and m.group(1) == name for i in rows):
        return MatrixPlan(f"{name} is in the support matrix already (row kept)")
    footnote = _AD_FOOTNOTE.search(text)
    architecture = f"`{name}`" + (f" [^{footnote.group(1)}]" if footnote else "")
    example = onboarded.registered_as or onboarded.model
    widths = [len(cell) for cell in lines[start + 1].strip().strip("|").split("|")]
    cells = [architecture, example.rsplit("/", 1)[-1], f"`{example}`"]
    if len(widths) != len(cells):
        return MatrixPlan(
            f"the first table of {MATRIX} has {len(widths)} columns, not 3 (no support-matrix row)"
        )
    row = "|" + "|".join(f" {cell:<{max(w - 2, len(cell))}} " for cell, w in zip(cells, widths, strict=True))
    row += "|\n"
    position = next(
        (i for i in rows if (m := _ARCHITECTURE.match(lines[i])) and m.group(1).lower() > name.lower()), end
    )
    lines.insert(position, row)
    return MatrixPlan(f"added {name} to the support matrix", {path: "".join(lines)})


def _first_table(lines: list[str]) -> tuple[int, int] | None:
    """(header line, line after the last row) of the first markdown table."""
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and re.match(r"^\|\s*:?-{3,}", lines[i + 1]):
            end = i + 2
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            return i, end
    return None
