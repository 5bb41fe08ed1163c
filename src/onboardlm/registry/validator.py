"""Check a whole registry: structure, unique names, file order, files present, settings valid."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from onboardlm.registry.errors import RegistryError
from onboardlm.registry.layout import DASHBOARD_DEFAULT, WORLD_SIZE_PATTERN, RegistryLayout
from onboardlm.registry.loader import (
    RegistryEntry,
    load_yaml_file,
    merge_files,
    parse_entries,
    settings_from_merged,
)

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One finding: what it is about (an entry name or a file), what is wrong, and how bad it is."""

    subject: str
    message: str
    severity: Severity = "error"


def validate_registry(registry_dir: Path | str | None = None) -> list[Problem]:
    """Every problem of the registry at ``registry_dir`` (default: the shipped one); empty when valid."""
    try:
        layout = RegistryLayout.at(registry_dir)
        entries = parse_entries(load_yaml_file(layout.models_file), str(layout.models_file))
    except RegistryError as err:
        return [Problem(err.subject, err.problem)]
    problems = _duplicate_names(entries)
    problems += _world_size_files(layout)
    for entry in entries:
        problems += _entry_problems(layout, entry)
    problems += _unused_configs(layout, entries)
    return problems


def has_errors(problems: list[Problem]) -> bool:
    """True when any problem is an error (warnings alone leave a registry usable)."""
    return any(problem.severity == "error" for problem in problems)


def _duplicate_names(entries: list[RegistryEntry]) -> list[Problem]:
    problems, seen = [], {}
    for entry in entries:
        key = entry.name.lower()
        if key in seen:
            same = (
                "listed more than once"
                if seen[key] == entry.name
                else f"differs only in case from {seen[key]}"
            )
            problems.append(Problem(entry.name, same))
        seen.setdefault(key, entry.name)
    return problems


def _world_size_files(layout: RegistryLayout) -> list[Problem]:
    problems = []
    for path in sorted(layout.configs_dir.glob("world_size_*.yaml")):
        match = WORLD_SIZE_PATTERN.match(path.name)
        if not match:
            continue
        try:
            value = load_yaml_file(path).get("world_size")
        except RegistryError as err:
            problems.append(Problem(err.subject, err.problem))
            continue
        if value != int(match.group(1)):
            problems.append(Problem(str(path), f"sets world_size: {value!r}, its name says {match.group(1)}"))
    return problems


def _entry_problems(layout: RegistryLayout, entry: RegistryEntry) -> list[Problem]:
    files = list(entry.yaml_extra)
    problems = []
    if not files or files[0] != DASHBOARD_DEFAULT:
        problems.append(
            Problem(entry.name, f"yaml_extra must start with {DASHBOARD_DEFAULT}, got {files[:1] or '[]'}")
        )
    world_sizes = [name for name in files if WORLD_SIZE_PATTERN.match(name)]
    if len(world_sizes) != 1:
        problems.append(
            Problem(
                entry.name, f"yaml_extra needs exactly one world_size_N.yaml, got {world_sizes or 'none'}"
            )
        )
    repeated = sorted({name for name in files if files.count(name) > 1})
    if repeated:
        problems.append(Problem(entry.name, f"{', '.join(repeated)} listed more than once", "warning"))
    missing = [name for name in files if not layout.config(name).is_file()]
    for name in missing:
        problems.append(Problem(entry.name, f"{layout.config(name)}: file not found"))
    if missing:
        return problems
    try:
        settings = settings_from_merged(merge_files(layout.config(name) for name in files))
    except RegistryError as err:
        return [*problems, Problem(entry.name, str(err))]
    if len(world_sizes) == 1:
        declared = int(WORLD_SIZE_PATTERN.match(world_sizes[0]).group(1))  # type: ignore[union-attr]
        if settings.world_size != declared:
            problems.append(
                Problem(
                    entry.name,
                    f"merged world_size is {settings.world_size}, not {declared} ({world_sizes[0]})",
                )
            )
    return problems


def _unused_configs(layout: RegistryLayout, entries: list[RegistryEntry]) -> list[Problem]:
    used = {name for entry in entries for name in entry.yaml_extra}
    return [
        Problem(str(path), "not used by any entry", "warning")
        for path in sorted(layout.configs_dir.glob("*.y*ml"))
        if path.name not in used
    ]
