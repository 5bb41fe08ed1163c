"""Lean models that live outside onboardlm: entry points and ``--custom-model-dir`` folders (seed 003).

A user's package registers its lean model the way a shipped file does, by calling
``AutoModelForCausalLMFactory.register_custom_model_cls(config_class_name, model_cls)`` when its
module is imported. onboardlm imports it from one of two places:

- an **entry point** of the group ``onboardlm.models`` in the package's metadata, e.g. in its
  ``pyproject.toml``::

      [project.entry-points."onboardlm.models"]
      my_llama = "my_package.modeling_my_llama"

  The entry point names a module (importing it registers) or a model class (registered for the name
  of its ``config_class``). Installed packages' entry points are imported by every command, once.
- a **folder** given with ``--custom-model-dir DIR``: every ``*.py`` file in it (not starting with
  ``_`` or ``test_``) is executed as a module, in name order. This runs the user's Python code, by the
  user's explicit choice; nothing is imported from a folder that was not named.

A later registration for the same config class replaces an earlier one (a folder's model replaces an
entry point's, which replaces a shipped one), so an out-of-tree copy of a shipped model overrides it.
:func:`registered_models` lists every lean model and where it came from.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from onboardlm.errors import OnboardlmError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "onboardlm.models"

#: config class name -> (class, where that registration came from); shipped models are absent
_origins: dict[str, tuple[type[nn.Module], str]] = {}
#: sys.path when the entry points were last scanned (a changed path is scanned again)
_scanned_path: tuple[str, ...] | None = None
#: entry points already imported, by (distribution, name, value)
_loaded_entry_points: set[tuple[str, str, str]] = set()
#: problems met while importing entry points (one line each), for commands to show
_problems: list[str] = []
_loading = False


class CustomModelError(OnboardlmError):
    """A custom model folder or entry point that cannot be imported."""


@dataclass(frozen=True)
class RegisteredModel:
    """One lean model the factory knows: its config class name, class and origin."""

    config_class: str
    model_class: type[nn.Module]
    origin: str  # "shipped", "entry point NAME (DIST)" or "custom model dir DIR"

    @property
    def source_file(self) -> Path | None:
        try:
            path = inspect.getsourcefile(self.model_class)
        except TypeError:
            return None
        return Path(path) if path else None


def _mapping() -> dict[str, type[nn.Module]]:
    from onboardlm.models.factory import AutoModelForCausalLMFactory

    return AutoModelForCausalLMFactory._custom_model_mapping


def _register_class(value: object, subject: str) -> None:
    """Register an entry point's class value for its ``config_class`` name."""
    from onboardlm.models.factory import AutoModelForCausalLMFactory

    config_class = getattr(value, "config_class", None)
    if not isinstance(value, type) or not issubclass(value, nn.Module) or config_class is None:
        raise CustomModelError(
            subject,
            "names neither a module nor an nn.Module class with a config_class",
            "fix the entry point",
        )
    AutoModelForCausalLMFactory.register_custom_model_cls(config_class.__name__, value)


def _record_origins(before: dict[str, type[nn.Module]], origin: str) -> list[str]:
    changed = [name for name, cls in _mapping().items() if before.get(name) is not cls]
    for name in changed:
        _origins[name] = (_mapping()[name], origin)
    return changed


def load_entry_point_models() -> list[str]:
    """Import every ``onboardlm.models`` entry point not imported yet; returns the config class names
    they registered. A failing entry point is skipped with a warning (see :func:`plugin_problems`)."""
    global _loading, _scanned_path
    if _loading or _scanned_path == tuple(sys.path):  # re-entered from a registration, or nothing new
        return []
    registered: list[str] = []
    _loading = True
    _scanned_path = tuple(sys.path)
    try:
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = entry_point.dist.name if entry_point.dist is not None else "?"
            key = (dist, entry_point.name, entry_point.value)
            if key in _loaded_entry_points:
                continue
            _loaded_entry_points.add(key)
            origin = f"entry point {entry_point.name} ({dist})"
            before = dict(_mapping())
            try:
                value = entry_point.load()
                if not inspect.ismodule(value):
                    _register_class(value, origin)
            except Exception as err:  # a third-party package's bug must not stop every command
                problem = f"{origin}: {entry_point.value} cannot be imported: {type(err).__name__}: {err}"
                logger.warning("%s", problem)
                _problems.append(problem)
                continue
            registered += _record_origins(before, origin)
    finally:
        _loading = False
    return registered


def plugin_problems() -> list[str]:
    """The entry points that failed to import, one line each."""
    return list(_problems)


def _module_name(path: Path) -> str:
    return "onboardlm_custom_" + re.sub(r"\W", "_", f"{path.parent.name}_{path.stem}")


def load_custom_model_dir(directory: Path) -> list[str]:
    """Execute every model file of ``directory`` (which registers its models); returns the config class
    names registered. Runs the folder's Python code: call it only for a folder the user named."""
    from onboardlm.models.factory import execute_model_file, import_shipped_models

    import_shipped_models()
    load_entry_point_models()
    if not directory.is_dir():
        raise CustomModelError(
            str(directory), "custom model folder not found", "pass a folder of model files"
        )
    files = sorted(path for path in directory.glob("*.py") if not path.name.startswith(("_", "test_")))
    if not files:
        raise CustomModelError(
            str(directory), "no model files (*.py) in the custom model folder", "put modeling_<type>.py in it"
        )
    origin = f"custom model dir {directory}"
    registered: list[str] = []
    for path in files:
        before = dict(_mapping())
        try:
            execute_model_file(path, _module_name(path))
        except Exception as err:
            sys.modules.pop(_module_name(path), None)
            raise CustomModelError(
                str(path), f"importing the model file failed: {type(err).__name__}: {err}", "fix the file"
            ) from None
        registered += _record_origins(before, origin)
    if not registered:
        raise CustomModelError(
            str(directory),
            "its files registered no model",
            "end each file with AutoModelForCausalLMFactory.register_custom_model_cls(...)",
        )
    return registered


def load_custom_models(directories: list[Path] | None = None) -> list[str]:
    """Entry points, then each of ``directories``; returns the config class names registered."""
    from onboardlm.models.factory import import_shipped_models

    import_shipped_models()
    registered = load_entry_point_models()
    for directory in directories or []:
        registered += load_custom_model_dir(directory)
    return registered


def registered_models() -> list[RegisteredModel]:
    """Every lean model the factory knows, by config class name, with its origin."""
    from onboardlm.models.factory import import_shipped_models

    import_shipped_models()
    load_entry_point_models()
    models = []
    for name, cls in sorted(_mapping().items()):
        recorded = _origins.get(name)
        origin = recorded[1] if recorded is not None and recorded[0] is cls else "shipped"
        models.append(RegisteredModel(name, cls, origin))
    return models


def find_registered(name: str) -> RegisteredModel | None:
    """The lean model registered under config class ``name``, or for a config whose ``model_type`` is
    ``name`` (as AutoConfig knows it)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    models = {model.config_class: model for model in registered_models()}
    if name in models:
        return models[name]
    try:
        config_cls = CONFIG_MAPPING[name]
    except KeyError:
        return None
    return models.get(config_cls.__name__)
