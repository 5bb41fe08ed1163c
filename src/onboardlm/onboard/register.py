"""Phase 8: the registry entry of an onboarded model (world size from the fit phase).

A hub id gets an entry ``{name, yaml_extra: [dashboard_default.yaml, world_size_N.yaml]}`` unless it
(or, for a GGUF file, the model it was converted from) is registered already. With
``--into-package`` the registry of the package is edited; otherwise a copy of it inside the output
folder, so a plain onboarding never changes the installed package.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from onboardlm.onboard.fit import FitReport
from onboardlm.onboard.resolve import ResolveResult
from onboardlm.onboard.survey import Coverage
from onboardlm.registry.editor import add_entry
from onboardlm.registry.layout import RegistryLayout
from onboardlm.registry.loader import RegistryEntry, read_entries


@dataclass(frozen=True)
class RegisterOutcome:
    summary: str
    registered_as: str | None
    added: bool
    staged_files: list[Path] = field(default_factory=list)
    package_files: list[Path] = field(default_factory=list)
    not_done: list[str] = field(default_factory=list)


def register(
    resolved: ResolveResult,
    fit: FitReport | None,
    coverage: Coverage | None,
    *,
    into_package: bool,
    registry_dir: Path | None,
    staging: Path,
) -> RegisterOutcome:
    entries = read_entries(registry_dir)
    family = ", ".join(coverage.registry_family) if coverage and coverage.registry_family else "none"
    existing = find_registered(resolved, entries)
    if existing is not None:
        return RegisterOutcome(
            f"already registered as {existing.name}; family: {family}", existing.name, False
        )
    if resolved.source.kind != "hub":
        reason = (
            f"registry: not registered, a {resolved.source.kind.replace('_', ' ')} names no hub checkpoint"
        )
        return RegisterOutcome("nothing to register (no hub id)", None, False, not_done=[reason])
    if fit is None:
        return RegisterOutcome("no world size (fit failed)", None, False, not_done=["registry: fit failed"])

    if into_package:
        added = add_entry(resolved.name, fit.world_size, registry_dir=registry_dir)
        return RegisterOutcome(
            f"added {resolved.name} (world size {fit.world_size}) to {added.models_file}",
            resolved.name,
            True,
            package_files=[added.models_file],
        )
    copy = staging / "registry"
    shutil.copytree(
        RegistryLayout.at(registry_dir).root, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__")
    )
    added = add_entry(resolved.name, fit.world_size, registry_dir=copy)
    return RegisterOutcome(
        f"added {resolved.name} (world size {fit.world_size}) to the registry copy in the output folder",
        resolved.name,
        True,
        staged_files=[added.models_file],
    )


def find_registered(resolved: ResolveResult, entries: list[RegistryEntry]) -> RegistryEntry | None:
    """The entry for this model: same hub id (any case), or for a GGUF file the entry whose model
    name starts its file name (``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``.../SmolLM2-135M-Instruct``)."""
    name = resolved.name.lower()
    for entry in entries:
        if entry.name.lower() == name:
            return entry
    if resolved.source.kind == "gguf":
        candidates = [e for e in entries if name.startswith(e.name.rsplit("/", 1)[-1].lower())]
        return max(candidates, key=lambda e: len(e.name), default=None)
    return None
