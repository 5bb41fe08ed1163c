"""BA1's dynamic check: import the model file, build it on a tiny config, load a reference strictly.

The model file is imported from its path under a unique module name (inside its package when it
lives in an importable one, so relative imports of shared utilities work). Its registrations (the
factory's custom-model table, AutoConfig) are undone afterwards, so reviewing an edited copy never
replaces the registered model of the running process.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from onboardlm.models.factory import AutoModelForCausalLMFactory, execute_model_file, load_checkpoint_into
from onboardlm.review.model_index import ModelIndex
from onboardlm.review.source import ReviewInputError

_module_numbers = itertools.count()


@dataclass(frozen=True)
class LoadCheck:
    """Whether the reference state dict loaded with no missing and no unexpected keys, and why not."""

    ok: bool
    reason: str
    keys: tuple[str, ...] = ()
    packed_experts: tuple[str, ...] = ()


def read_checkpoint_keys(path: Path) -> frozenset[str]:
    """Keys from a JSON list, a safetensors index (``weight_map``) or a ``.safetensors`` file."""
    if not path.is_file():
        raise ReviewInputError(str(path), "checkpoint keys file does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return frozenset(handle.keys())
        except Exception as err:
            raise ReviewInputError(str(path), f"is not a readable safetensors file: {err}") from None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReviewInputError(str(path), f"checkpoint keys file is not JSON: {err}") from None
    keys = data.get("weight_map") if isinstance(data, dict) else data
    if isinstance(keys, dict):
        keys = list(keys)
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise ReviewInputError(
            str(path), "expected a JSON list of keys or a safetensors index with 'weight_map'"
        )
    return frozenset(keys)


def check_strict_load(
    model: ModelIndex,
    reference: str | None,
    checkpoint_keys: frozenset[str] | None,
    config: Any = None,
) -> LoadCheck:
    """Build the model file's causal LM on a tiny copy of ``config`` (default: the config class's
    defaults, completed as a checkpoint's would be) and load the reference into it strictly."""
    with _isolated_registrations(), _module_name(model.src.path) as name:
        try:
            module = execute_model_file(model.src.path, name)
        except Exception as err:  # the file's own code failed: report it, do not crash the review
            return LoadCheck(False, f"importing the model file failed: {type(err).__name__}: {err}")
        try:
            lean, tiny = _build(module, model, config)
        except Exception as err:
            return LoadCheck(
                False, f"building the model on a tiny config failed: {type(err).__name__}: {err}"
            )
        if checkpoint_keys is not None:
            return _compare_keys(lean, checkpoint_keys)
        return _load_reference(lean, tiny, reference or tiny.model_type)


# --------------------------------------------------------------------------------------------------
# importing and building
# --------------------------------------------------------------------------------------------------


@contextmanager
def _module_name(path: Path) -> Iterator[str]:
    """A unique module name for ``path`` (in its package when it has one), removed from sys.modules after."""
    package = _package_of(path)
    name = f"_onboardlm_review_{path.stem}_{next(_module_numbers)}"
    if package:
        name = f"{package}.{name}"
    try:
        yield name
    finally:
        sys.modules.pop(name, None)


def _package_of(path: Path) -> str | None:
    """The importable package whose directory holds ``path``, if any."""
    parts: list[str] = []
    directory = path.resolve().parent
    while (directory / "__init__.py").exists():
        parts.insert(0, directory.name)
        directory = directory.parent
    if not parts:
        return None
    package = ".".join(parts)
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    paths = {Path(p).resolve() for p in getattr(module, "__path__", [])}
    return package if path.resolve().parent in paths else None


@contextmanager
def _isolated_registrations() -> Iterator[None]:
    """Undo the factory and AutoConfig registrations that importing a model file makes."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    configs = dict(CONFIG_MAPPING._extra_content)
    try:
        with AutoModelForCausalLMFactory.registrations_restored():
            yield
    finally:
        CONFIG_MAPPING._extra_content.clear()
        CONFIG_MAPPING._extra_content.update(configs)


def _build(module: ModuleType, model: ModelIndex, config: Any) -> tuple[Any, Any]:
    """The lean causal LM on the tiny copy of ``config`` (or of the file's config class's defaults)."""
    import torch

    from onboardlm.models.config_completion import complete_default_config
    from onboardlm.testing.tiny_config import tiny_config

    assert model.causal_lm is not None
    cls = getattr(module, model.causal_lm.name)
    config_cls = _config_class(module, model, cls)
    if config is None:
        config = config_cls()
        complete_default_config(config)
    elif not isinstance(config, config_cls):  # e.g. a bundled config class: same fields, its class
        config = config_cls.from_dict(config.to_dict())
    tiny = tiny_config(config)
    with torch.device("cpu"):
        return cls(tiny).eval(), tiny


def _config_class(module: ModuleType, model: ModelIndex, cls: type) -> type:
    """The config class the file registers (bundled or from transformers), else ``cls.config_class``."""
    import transformers

    call = model.registration
    if call is not None and call.args:
        name = getattr(call.args[0], "value", None)
        if isinstance(name, str):
            found = getattr(module, name, None) or getattr(transformers, name, None)
            if isinstance(found, type):
                return found
    config_cls = getattr(cls, "config_class", None)
    if not isinstance(config_cls, type):
        raise LookupError("no config class: neither the registered name nor config_class names one")
    return config_cls


# --------------------------------------------------------------------------------------------------
# comparing with the reference
# --------------------------------------------------------------------------------------------------


def _load_reference(lean: Any, config: Any, model_type: str) -> LoadCheck:
    from transformers import AutoModelForCausalLM

    from onboardlm.errors import WeightsError

    try:
        reference = AutoModelForCausalLM.from_config(_reference_config(config, model_type))
    except Exception as err:  # no causal LM for the type, or fields it does not accept
        reason = f"transformers builds no {model_type!r} causal LM on the tiny config ({err}); give --checkpoint-keys"
        return LoadCheck(False, reason)
    state_dict = reference.state_dict()
    packed = tuple(sorted(k for k, v in state_dict.items() if "experts" in k and v.dim() >= 3))
    subject = f"transformers {type(reference).__name__} ({model_type}) state dict"
    try:
        load_checkpoint_into(lean, _copy(state_dict), subject=subject)
    except WeightsError as err:
        return LoadCheck(False, str(err), _mismatched_keys(lean, state_dict), packed)
    except Exception as err:  # a load hook of the file failed
        return LoadCheck(
            False, f"loading {subject} failed in a load hook: {type(err).__name__}: {err}", (), packed
        )
    return LoadCheck(True, f"{subject} loads with strict=True: {len(state_dict)} tensors", (), packed)


def _reference_config(config: Any, model_type: str) -> Any:
    """The tiny config itself for its own model_type, else its fields under ``model_type``'s class."""
    from transformers import AutoConfig

    if config.model_type == model_type:
        return copy.deepcopy(config)
    return AutoConfig.for_model(
        model_type, **{k: v for k, v in config.to_dict().items() if k != "model_type"}
    )


def _mismatched_keys(lean: Any, state_dict: dict[str, Any]) -> tuple[str, ...]:
    """Missing then unexpected keys of a non-strict load (hooks run), to locate them in the file."""
    try:
        result = lean.load_state_dict(_copy(state_dict), strict=False)
    except Exception:  # shape mismatches: the message already names them
        return ()
    return (*sorted(result.missing_keys), *sorted(result.unexpected_keys))


def _copy(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {key: value.detach().clone() for key, value in state_dict.items()}


def _compare_keys(lean: Any, keys: frozenset[str]) -> LoadCheck:
    """Key patterns (layer and expert numbers as ``*``) of the model against the checkpoint's."""
    ours = {_pattern(k) for k in lean.state_dict()}
    theirs = {_pattern(k) for k in keys}
    tied = {_pattern(k) for k in _tied_keys(lean)}
    missing, unexpected = sorted(ours - theirs - tied), sorted(theirs - ours)
    if not missing and not unexpected:
        return LoadCheck(True, f"the model's key patterns equal the checkpoint's ({len(theirs)} patterns)")
    parts = [
        f"missing keys {missing}" if missing else "",
        f"unexpected keys {unexpected}" if unexpected else "",
    ]
    reason = "checkpoint keys do not match the model: " + "; ".join(p for p in parts if p)
    return LoadCheck(False, reason, (*missing, *unexpected))


def _pattern(key: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in key.split("."))


def _tied_keys(lean: Any) -> set[str]:
    tied = getattr(lean, "_tied_weights_keys", None) or {}
    return set(tied)
