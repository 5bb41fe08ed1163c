"""Read the registry: YAML files, deep merge left to right, settings per model with provenance.

``settings_for_model(name)`` (the ``--use-registry`` path) and ``merged_settings([FILE])`` on the file
that ``standalone_yaml(name)`` renders (the ``--args.yaml-extra FILE`` path) give the same settings.
"""

from __future__ import annotations

import copy
import difflib
import io
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints, ValidationError
from pydantic import dataclasses as pydantic_dataclasses
from pydantic_core import PydanticCustomError
from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from onboardlm.registry.errors import RegistryError
from onboardlm.registry.layout import RegistryLayout
from onboardlm.registry.settings import RunSettings, allowed_keys, field_problems

ENTRY_KEYS = ("name", "yaml_extra")
TOP_LEVEL_KEYS = ("version", "description", "models")


def _yaml() -> YAML:
    """ruamel.yaml's safe loader/dumper (YAML 1.2; a key given twice in one mapping is an error)."""
    yaml = YAML(typ="safe")
    yaml.default_flow_style = None  # block mappings, flow lists of scalars
    return yaml


def parse_yaml_text(text: str, source: str) -> Any:
    """Parse YAML text; a syntax error becomes a one-line :class:`RegistryError` naming ``source`` and
    the line."""
    try:
        return _yaml().load(text)
    except MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if isinstance(err, DuplicateKeyError):  # its context is only "while constructing a mapping"
            raise RegistryError(
                source, f"malformed YAML{where}: {err.problem.removeprefix('found ')}"
            ) from None
        message = f"malformed YAML{where}: {err.problem or err.context}"
        if err.problem and err.context and err.context_mark:
            message += f" ({err.context} at line {err.context_mark.line + 1})"
        raise RegistryError(source, message) from None
    except YAMLError as err:
        raise RegistryError(source, f"malformed YAML: {' '.join(str(err).split())}") from None


def dump_yaml_text(data: Any) -> str:
    """``data`` as YAML text that :func:`parse_yaml_text` reads back equal (keys in insertion order)."""
    stream = io.StringIO()
    _yaml().dump(data, stream)
    return stream.getvalue()


def load_yaml_file(path: Path | str) -> dict[str, Any]:
    """Load one YAML file that holds a mapping (an empty file is ``{}``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RegistryError(str(path), "file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RegistryError(str(path), f"cannot read file: {err}") from None
    data = parse_yaml_text(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RegistryError(str(path), f"expected a mapping at the top level, got a {type(data).__name__}")
    bad = [key for key in data if not isinstance(key, str)]
    if bad:
        raise RegistryError(str(path), f"keys must be strings, got {bad[0]!r}")
    return data


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base``: mappings merge recursively, lists and scalars replace."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def leaf_keys(data: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted paths of the leaves of nested mappings (lists, scalars and empty mappings are leaves)."""
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaf_keys(value, f"{path}.")
        else:
            yield path


@dataclass(frozen=True)
class MergedConfig:
    """Files merged left to right, and for each leaf key the file that set it last."""

    files: tuple[Path, ...]
    data: dict[str, Any]
    sources: dict[str, Path] = field(default_factory=dict)

    def source_of(self, key: str) -> Path | None:
        """The file that set ``key``, one of its children, or the leaf (e.g. a list) that contains it."""
        if key in self.sources:
            return self.sources[key]
        for leaf, path in self.sources.items():
            if leaf.startswith(f"{key}.") or key.startswith(f"{leaf}."):
                return path
        return None


def merge_files(paths: Iterable[Path | str]) -> MergedConfig:
    """Load and deep-merge YAML files left to right, remembering which file set each leaf."""
    files = tuple(Path(p) for p in paths)
    loaded = [(path, load_yaml_file(path)) for path in files]
    data: dict[str, Any] = {}
    for _, part in loaded:
        data = deep_merge(data, part)
    leaves = [(path, set(leaf_keys(part))) for path, part in loaded]
    sources: dict[str, Path] = {}
    for leaf in leaf_keys(data):
        for path, keys in reversed(leaves):
            if leaf in keys:
                sources[leaf] = path
                break
    return MergedConfig(files, data, sources)


def settings_from_merged(merged: MergedConfig) -> RunSettings:
    """Validate merged data; an invalid value becomes a :class:`RegistryError` naming its file and key."""
    try:
        return RunSettings.model_validate(merged.data)
    except ValidationError as err:
        raise _settings_error(err, merged) from None


def _settings_error(err: ValidationError, merged: MergedConfig) -> RegistryError:
    by_file: dict[str, list[str]] = {}
    for problem in field_problems(err):
        message = problem.message
        if problem.unknown_key:
            allowed = allowed_keys(problem.key)
            close = difflib.get_close_matches(problem.key.rsplit(".", 1)[-1], allowed, n=1)
            message += f", did you mean '{close[0]}'?" if close else f" (allowed: {', '.join(allowed)})"
        source = merged.source_of(problem.key) if problem.key else None
        subject = str(source) if source else "settings merged from " + ", ".join(p.name for p in merged.files)
        text = f"key '{problem.key}': {message}" if problem.key else message
        by_file.setdefault(subject, []).append(text)
    subject, messages = next(iter(by_file.items()))
    problem = "; ".join(messages)
    for other, more in list(by_file.items())[1:]:
        problem += "; " + "; ".join(f"{other}: {m}" for m in more)
    return RegistryError(subject, problem)


def merged_settings(yaml_files: Sequence[Path | str]) -> RunSettings:
    """The settings that ``yaml_files`` give when merged left to right over the defaults."""
    return settings_from_merged(merge_files(yaml_files))


def _non_blank(name: str) -> str:
    if not name.strip():
        raise PydanticCustomError("blank", "blank")
    return name


def _bare_file_name(name: str) -> str:
    if "/" in name or "\\" in name:
        raise PydanticCustomError("nested_path", "must be a file name under configs/")
    return name


@pydantic_dataclasses.dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class RegistryEntry:
    """One model of ``models.yaml``: its name and the config files merged for it, in order."""

    name: Annotated[str, AfterValidator(_non_blank)]
    yaml_extra: tuple[Annotated[str, StringConstraints(min_length=1), AfterValidator(_bare_file_name)], ...]


class ModelsFile(BaseModel):
    """The schema of ``models.yaml``."""

    model_config = ConfigDict(extra="forbid")

    version: int | None = None
    description: str | None = None
    models: list[RegistryEntry]


def parse_entries(data: Mapping[str, Any], source: str) -> list[RegistryEntry]:
    """Check the structure of a loaded ``models.yaml`` and return its entries (duplicates kept)."""
    try:
        return ModelsFile.model_validate(data).models
    except ValidationError as err:
        raise RegistryError(source, _structure_problem(err, data)) from None


def _structure_problem(err: ValidationError, data: Mapping[str, Any]) -> str:
    """One line for the first problem in file order (an entry's unknown key before its fields)."""

    def order(item: Any) -> tuple[int, ...]:
        loc = item["loc"]
        if len(loc) == 1:
            return (1, TOP_LEVEL_KEYS.index(loc[0])) if loc[0] in TOP_LEVEL_KEYS else (0,)
        known = len(loc) > 2 and loc[2] in ENTRY_KEYS
        return (2, loc[1], 1 + ENTRY_KEYS.index(loc[2]) if known else 0)

    item = min(err.errors(), key=order)
    loc = item["loc"]
    if len(loc) == 1 and loc[0] not in TOP_LEVEL_KEYS:
        return f"unknown top-level key '{loc[0]}' (allowed: {', '.join(TOP_LEVEL_KEYS)})"
    if loc == ("models",):
        return "expected a 'models' list at the top level"
    if len(loc) == 1:
        return f"key '{loc[0]}': {item['msg'][0].lower()}{item['msg'][1:]}"
    where = f"models[{loc[1]}]"
    if len(loc) == 2:
        return f"{where}: expected a mapping with {' and '.join(ENTRY_KEYS)}"
    if loc[2] not in ENTRY_KEYS:
        return f"{where}: unknown key '{loc[2]}' (allowed: {', '.join(ENTRY_KEYS)})"
    if loc[2] == "name":
        return f"{where}: 'name' must be a non-empty string"
    name = data["models"][loc[1]]["name"]
    if item["type"] == "nested_path":
        return f"{where} ({name}): '{item['input']}' {item['msg']}"
    return f"{where} ({name}): 'yaml_extra' must be a list of file names"


def read_entries(registry_dir: Path | str | None = None) -> list[RegistryEntry]:
    """The entries of a registry's ``models.yaml``, in file order."""
    layout = RegistryLayout.at(registry_dir)
    return parse_entries(load_yaml_file(layout.models_file), str(layout.models_file))


def close_matches(name: str, names: Sequence[str], limit: int = 3) -> list[str]:
    """Registry names that look like ``name`` (case-insensitive, full id or the part after the org)."""
    lowered = {candidate.lower(): candidate for candidate in names}
    query = name.lower()
    found = [lowered[m] for m in difflib.get_close_matches(query, list(lowered), n=limit, cutoff=0.6)]
    bases = {candidate.rsplit("/", 1)[-1].lower(): candidate for candidate in names}
    found += [bases[m] for m in difflib.get_close_matches(query.rsplit("/", 1)[-1], list(bases), n=limit)]
    return list(dict.fromkeys(found))[:limit]


def find_entry(name: str, registry_dir: Path | str | None = None) -> RegistryEntry:
    """The entry called ``name``; an unknown name is an error that lists close matches."""
    layout = RegistryLayout.at(registry_dir)
    entries = read_entries(layout.root)
    for entry in entries:
        if entry.name == name:
            return entry
    matches = close_matches(name, [entry.name for entry in entries])
    hint = f"did you mean {', '.join(matches)}?" if matches else "see `onboardlm registry list`"
    raise RegistryError(name, f"not in the registry {layout.models_file}", hint)


def entry_files(entry: RegistryEntry, registry_dir: Path | str | None = None) -> list[Path]:
    """The paths of an entry's ``yaml_extra`` files, in merge order."""
    layout = RegistryLayout.at(registry_dir)
    return [layout.config(name) for name in entry.yaml_extra]


def merged_for_model(name: str, registry_dir: Path | str | None = None) -> MergedConfig:
    """The merged (not yet validated) config of registry entry ``name``."""
    return merge_files(entry_files(find_entry(name, registry_dir), registry_dir))


def settings_for_model(name: str, registry_dir: Path | str | None = None) -> RunSettings:
    """The settings of registry entry ``name`` (the ``--use-registry`` path)."""
    return settings_from_merged(merged_for_model(name, registry_dir))


def standalone_yaml(name: str, registry_dir: Path | str | None = None) -> dict[str, Any]:
    """One self-contained config equal to entry ``name``: pass it as ``--args.yaml-extra FILE``."""
    merged = merged_for_model(name, registry_dir)
    settings_from_merged(merged)
    return merged.data


def render_standalone_yaml(name: str, registry_dir: Path | str | None = None) -> str:
    """:func:`standalone_yaml` as YAML text with a header saying where it came from."""
    data = standalone_yaml(name, registry_dir)
    entry = find_entry(name, registry_dir)
    header = (
        f"# Standalone onboardlm config for {name}.\n"
        f"# Generated from the registry: {' + '.join(entry.yaml_extra)} (merged left to right).\n"
        f"# Use: onboardlm run --model {name} --args.yaml-extra THIS_FILE\n"
    )
    return header + dump_yaml_text(data)


def load_run_settings(
    model: str | None = None,
    *,
    use_registry: bool = False,
    yaml_extra: Sequence[Path | str] = (),
    registry_dir: Path | str | None = None,
) -> RunSettings:
    """Settings for a run: the registry entry of ``model`` (if ``use_registry``), then ``yaml_extra``."""
    files: list[Path] = []
    if use_registry:
        if not model:
            raise RegistryError("--use-registry", "needs a model name (--model)")
        files += entry_files(find_entry(model, registry_dir), registry_dir)
    files += [Path(p) for p in yaml_extra]
    return merged_settings(files)


@dataclass(frozen=True)
class SettingRow:
    """One leaf of the settings, its value, and the file that set it (``None``: the default)."""

    key: str
    value: Any
    source: Path | None


@dataclass(frozen=True)
class ExplainedSettings:
    """An entry's validated settings with the provenance of every key."""

    name: str
    files: tuple[Path, ...]
    settings: RunSettings
    rows: tuple[SettingRow, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "yaml_extra": [path.name for path in self.files],
            "settings": self.settings.model_dump(mode="json"),
            "sources": {row.key: row.source.name if row.source else "default" for row in self.rows},
        }


def _leaf_values(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _leaf_values(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def explain_settings(name: str, registry_dir: Path | str | None = None) -> ExplainedSettings:
    """The settings of entry ``name`` and, per key, which file set it."""
    merged = merged_for_model(name, registry_dir)
    settings = settings_from_merged(merged)
    rows = tuple(
        SettingRow(key, value, merged.source_of(key)) for key, value in _leaf_values(settings.model_dump())
    )
    return ExplainedSettings(name, merged.files, settings, rows)
