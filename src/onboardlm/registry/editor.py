"""Safe edits of ``models.yaml``: a round trip through ruamel.yaml that keeps every other entry and
comment byte for byte, checked before and after, written atomically; on any failure nothing changes.
"""

from __future__ import annotations

import difflib
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError as RuamelYAMLError
from ruamel.yaml.scalarstring import SingleQuotedScalarString

from onboardlm.registry.atomic import atomic_write_bytes, atomic_write_text
from onboardlm.registry.errors import RegistryError
from onboardlm.registry.layout import DASHBOARD_DEFAULT, WORLD_SIZE_PATTERN, RegistryLayout, world_size_file
from onboardlm.registry.loader import (
    RegistryEntry,
    load_yaml_file,
    merge_files,
    parse_entries,
    parse_yaml_text,
    settings_from_merged,
)
from onboardlm.registry.settings import RunSettings

#: Parameter-count limits (inclusive upper bounds, except the first) of world sizes 1, 2 and 4.
_WORLD_SIZE_LIMITS = ((1, 2_000_000_000, False), (2, 15_000_000_000, True), (4, 80_000_000_000, True))

#: (mapping, sequence, offset) indentations tried until one reproduces the file exactly.
_INDENTS = ((2, 4, 2), (2, 2, 0)) + tuple(
    (m, s, o)
    for m in (2, 4)
    for s in (2, 4, 6, 8)
    for o in range(0, s - 1, 2)
    if (m, s, o) not in ((2, 4, 2), (2, 2, 0))
)

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def world_size_for_params(n_params: int) -> int:
    """GPUs for a model of ``n_params`` parameters: 1 below 2B, 2 up to 15B, 4 up to 80B, 8 above."""
    if n_params <= 0:
        raise RegistryError("parameter count", f"must be positive, got {n_params}")
    for world_size, limit, inclusive in _WORLD_SIZE_LIMITS:
        if n_params < limit or (inclusive and n_params == limit):
            return world_size
    return 8


def parse_param_count(text: str) -> int:
    """``'135M'``, ``'1.7B'``, ``'7e9'`` or ``'8000000000'`` -> a parameter count."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", text.lower())
    if not match:
        raise RegistryError(text, "not a parameter count", "write e.g. 135M, 1.7B or 8e9")
    count = round(float(match.group(1)) * _SUFFIXES[match.group(2)])
    if count <= 0:
        raise RegistryError(text, "parameter count must be positive")
    return count


@dataclass(frozen=True)
class AddResult:
    """What :func:`add_entry` wrote."""

    name: str
    yaml_extra: tuple[str, ...]
    models_file: Path
    copied_configs: tuple[Path, ...]
    settings: RunSettings


@dataclass(frozen=True)
class _ExtraConfig:
    name: str
    read_from: Path
    copy_to: Path | None


def add_entry(
    name: str,
    world_size: int,
    extra_files: Sequence[Path | str] = (),
    registry_dir: Path | str | None = None,
) -> AddResult:
    """Append entry ``name`` with ``[dashboard_default.yaml, world_size_N.yaml, *extra_files]``.

    An extra file is a config name under ``configs/`` or a path to a YAML file, which is copied
    there. Refuses a duplicate (also one that differs only in case), a missing config, settings that
    do not validate, and any edit that would change a byte of the file outside the new entry.
    """
    layout = RegistryLayout.at(registry_dir)
    models_file = layout.models_file
    _check_name(name)
    before = parse_entries(load_yaml_file(models_file), str(models_file))
    _refuse_duplicate(name, before)
    yaml_extra, extras = _yaml_extra(layout, world_size, extra_files)

    sources = {extra.name: extra.read_from for extra in extras}
    merged = merge_files(sources.get(file, layout.config(file)) for file in yaml_extra)
    settings = settings_from_merged(merged)

    raw = models_file.read_bytes()
    old_text = raw.decode("utf-8")
    new_text = _appended(old_text, name, yaml_extra, str(models_file))
    after = parse_entries(parse_yaml_text(new_text, str(models_file)), str(models_file))
    if after != [*before, RegistryEntry(name, yaml_extra)]:
        raise RegistryError(
            str(models_file), "internal check failed: the edit changed other entries; file unchanged"
        )

    copied: list[Path] = []
    try:
        for extra in extras:
            if extra.copy_to is not None:
                atomic_write_bytes(extra.copy_to, extra.read_from.read_bytes())
                copied.append(extra.copy_to)
        atomic_write_text(models_file, new_text)
    except OSError as err:
        for path in copied:
            path.unlink(missing_ok=True)
        raise RegistryError(str(models_file), f"could not write ({err}); registry unchanged") from None
    return AddResult(name, yaml_extra, models_file, tuple(copied), settings)


def _check_name(name: str) -> None:
    if not name or name != name.strip() or any(ord(ch) < 32 for ch in name):
        raise RegistryError(repr(name), "a model name must be a non-empty id without surrounding spaces")


def _refuse_duplicate(name: str, entries: Sequence[RegistryEntry]) -> None:
    for entry in entries:
        if entry.name == name:
            raise RegistryError(name, "already in the registry", "edit its entry instead of adding it again")
        if entry.name.lower() == name.lower():
            raise RegistryError(name, f"differs only in case from the existing entry {entry.name}")


def _yaml_extra(
    layout: RegistryLayout, world_size: int, extra_files: Sequence[Path | str]
) -> tuple[tuple[str, ...], list[_ExtraConfig]]:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise RegistryError("world size", f"must be a positive integer, got {world_size!r}")
    ws_file = world_size_file(world_size)
    if not layout.config(ws_file).is_file():
        available = sorted(
            int(m.group(1))
            for p in layout.configs_dir.glob("world_size_*.yaml")
            if (m := WORLD_SIZE_PATTERN.match(p.name))
        )
        raise RegistryError(
            str(layout.config(ws_file)),
            "config file not found",
            f"world sizes available: {available or 'none'}",
        )
    extras = [_resolve_extra(layout, item) for item in extra_files]
    names = [DASHBOARD_DEFAULT, ws_file, *(extra.name for extra in extras)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise RegistryError(repeated[0], "given more than once in yaml_extra")
    return tuple(names), extras


def _resolve_extra(layout: RegistryLayout, item: Path | str) -> _ExtraConfig:
    path = Path(item)
    if not path.name.endswith((".yaml", ".yml")):
        raise RegistryError(str(item), "a config file must end in .yaml or .yml")
    if path.name == DASHBOARD_DEFAULT or WORLD_SIZE_PATTERN.match(path.name):
        raise RegistryError(
            str(item), "is added to every entry already (choose the world size with --world-size)"
        )
    in_registry = layout.config(path.name)
    if str(item) == path.name and in_registry.is_file():
        return _ExtraConfig(path.name, in_registry, None)
    if not path.is_file():
        raise RegistryError(
            str(item), f"config file not found (looked under {layout.configs_dir} and as a path)"
        )
    if in_registry.exists():
        if in_registry.read_bytes() != path.read_bytes():
            raise RegistryError(str(item), f"a different {in_registry} exists already", "rename the file")
        return _ExtraConfig(path.name, in_registry, None)
    return _ExtraConfig(path.name, path, in_registry)


def _round_trip(text: str, source: str) -> tuple[YAML, Any]:
    """A ruamel loader/dumper that reproduces ``text`` exactly, and the loaded document."""
    for mapping, sequence, offset in _INDENTS:
        yaml = YAML(typ="rt")
        yaml.preserve_quotes = True
        yaml.width = 4096
        yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
        try:
            document = yaml.load(text)
        except RuamelYAMLError as err:
            raise RegistryError(source, f"malformed YAML: {err}") from None
        if _dump(yaml, document) == text:
            return yaml, document
    raise RegistryError(
        source,
        "cannot add an entry without reformatting the file",
        "its layout is unusual; add the entry by hand",
    )


def _dump(yaml: YAML, document: Any) -> str:
    stream = io.StringIO()
    yaml.dump(document, stream)
    return stream.getvalue()


def _appended(text: str, name: str, yaml_extra: Sequence[str], source: str) -> str:
    """``text`` with the entry appended to ``models``; every other byte kept (checked)."""
    return append_entry_text(text, {"name": name, "yaml_extra": list(yaml_extra)}, source)


def append_entry_text(text: str, fields: Mapping[str, Any], source: str) -> str:
    """``text`` (a ``models.yaml``) with an entry of ``fields`` appended to ``models``; every other byte
    kept (checked). A ``yaml_extra`` list takes the flow style and quoting of the last entry's."""
    crlf = "\r\n" in text
    base = text.replace("\r\n", "\n")
    base = base if base.endswith("\n") else base + "\n"
    yaml, document = _round_trip(base, source)
    models = document["models"]
    if not isinstance(models, CommentedSeq) or not models or models.fa.flow_style():
        raise RegistryError(
            source, "'models' must be a non-empty block list to add to", "add the entry by hand"
        )
    entry = CommentedMap()
    last_files = models[-1].get("yaml_extra") if isinstance(models[-1], dict) else None
    for key, value in fields.items():
        if key == "yaml_extra":
            quoted = bool(last_files) and isinstance(last_files[0], SingleQuotedScalarString)
            value = CommentedSeq(SingleQuotedScalarString(v) if quoted else v for v in value)
            if not isinstance(last_files, CommentedSeq) or last_files.fa.flow_style():
                value.fa.set_flow_style()
        entry[key] = value
    models.append(entry)
    new = _dump(yaml, document)
    if not _only_inserted(base, new):
        raise RegistryError(source, "the edit would change lines outside the new entry; file unchanged")
    return new.replace("\n", "\r\n") if crlf else new


def _only_inserted(old: str, new: str) -> bool:
    """True when ``new`` is ``old`` with lines inserted and nothing else changed."""
    matcher = difflib.SequenceMatcher(a=old.splitlines(True), b=new.splitlines(True), autojunk=False)
    return all(tag in ("equal", "insert") for tag, *_ in matcher.get_opcodes())
