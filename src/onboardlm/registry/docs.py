"""Phases 10-11 of an onboarding, as one step: record the report, regenerate the matrix and the cookbook.

``onboardlm onboard --into-package`` calls :func:`record_and_refresh` with its report data after it has
written the model into the checkout; ``onboardlm registry record REPORT.json`` does the same for a
report written earlier.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onboardlm.registry.checkout import CheckoutLayout
from onboardlm.registry.cookbook import write_cookbook
from onboardlm.registry.loader import read_entries
from onboardlm.registry.matrix import write_matrix
from onboardlm.registry.records import OnboardRecord, record_from_report, write_record


@dataclass(frozen=True)
class DocsUpdate:
    """What a refresh wrote: the record (None when only regenerating), the matrix, the notebooks."""

    record: OnboardRecord | None
    files: list[Path] = field(default_factory=list)


def refresh_docs(layout: CheckoutLayout) -> list[Path]:
    """Regenerate ``docs/support-matrix.md`` and every cookbook notebook; return the paths written."""
    notebooks = write_cookbook(layout)  # first: the matrix links the notebooks that exist
    return [write_matrix(layout), *notebooks]


def record_and_refresh(report: Mapping[str, Any], layout: CheckoutLayout) -> DocsUpdate:
    """Write the record of ``report`` (report.json's data) into ``docs/onboarded/``, then refresh.

    A model that belongs to no registry entry (a bare model_type, a local folder) gets no record: the
    matrix lists checkpoints by registry entry. The matrix is refreshed all the same (a new lean file).
    """
    import transformers

    names = [entry.name for entry in read_entries(layout.registry_dir)]
    record = record_from_report(report, names, transformers.__version__)
    if record.registered_as is None:
        return DocsUpdate(None, refresh_docs(layout))
    path = write_record(record, layout.records_dir)
    return DocsUpdate(record, [path, *refresh_docs(layout)])
