"""Phase 1: what onboardlm already covers for this model, and which models are its family.

- coverage: a lean class registered with the factory for this config class (shipped or user's);
- registry family: entries of models.yaml whose name shares this model's family stem
  (``Qwen/Qwen3-8B`` -> ``Qwen/Qwen3-0.6B``, ``Qwen/Qwen3-32B``, ...);
- transformers lineage: the models this one is derived from, read from the imports of its
  ``modular_<type>.py`` (transformers writes new models as edits of older ones there).
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PretrainedConfig

from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.registry.loader import read_entries

#: The size token that ends a family stem: "-135M", "-1.7B", "-8x7B", "_7b" ...
_SIZE = re.compile(r"[-_](\d+x)?\d+(\.\d+)?[bBmM]\b")


@dataclass(frozen=True)
class Coverage:
    """Phase 1 findings."""

    config_class: str
    custom_class: str | None  # "module.Class" of a registered lean model, or None
    registry_family: list[str] = field(default_factory=list)
    derived_from: list[str] = field(default_factory=list)  # transformers model types

    @property
    def already_supported(self) -> bool:
        return self.custom_class is not None


def survey(config: PretrainedConfig, model_name: str, registry_dir: Path | None = None) -> Coverage:
    custom = AutoModelForCausalLMFactory.custom_model_cls(config)
    return Coverage(
        config_class=type(config).__name__,
        custom_class=f"{custom.__module__}.{custom.__qualname__}" if custom is not None else None,
        registry_family=registry_family(model_name, registry_dir),
        derived_from=derived_model_types(config.model_type),
    )


def family_stem(model_name: str) -> str | None:
    """The name up to its size token (``"Qwen/Qwen3"`` for ``"Qwen/Qwen3-8B"``), lowercased; None
    when the name carries no size (a bare model_type, a local folder without one)."""
    base = model_name.rsplit("/", 1)[-1]
    match = _SIZE.search(base)
    return base[: match.start()].lower() if match else None


def registry_family(model_name: str, registry_dir: Path | None = None) -> list[str]:
    """Registry entries of the same family as ``model_name`` (its own entry included)."""
    stem = family_stem(model_name)
    if stem is None:
        return []
    return [entry.name for entry in read_entries(registry_dir) if family_stem(entry.name) == stem]


def derived_model_types(model_type: str) -> list[str]:
    """Model types whose modeling code the modular file of ``model_type`` imports, in import order."""
    spec = importlib.util.find_spec("transformers")
    assert spec is not None and spec.origin is not None
    folder = Path(spec.origin).parent / "models" / model_type.replace("-", "_")
    modular = folder / f"modular_{folder.name}.py"
    if not modular.is_file():
        return []
    found: list[str] = []
    for node in ast.walk(ast.parse(modular.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module:
            parent = node.module.split(".", 1)[0]
            if parent != folder.name and parent not in found:
                found.append(parent)
    return found
