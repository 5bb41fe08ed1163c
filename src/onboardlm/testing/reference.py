"""Tests that need transformers' implementation of a model type skip where the release lacks it."""

from __future__ import annotations

import pytest
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES


def installed_model_type(name: str) -> str | None:
    """The model type ``name`` stands for in the installed transformers, or None when it has none.

    A module or file name has ``_`` where a model type may have ``-`` (``openai_gpt`` -> ``openai-gpt``).
    """
    return next((t for t in (name, name.replace("_", "-")) if t in CONFIG_MAPPING_NAMES), None)


def missing_reference_reason(model_type: str) -> str:
    """The skip reason for a model type the installed transformers lacks."""
    return f"transformers {transformers.__version__} has no {model_type} (the reference implementation)"


def requires_reference(model_type: str) -> pytest.MarkDecorator:
    """Skip, naming the release, when the installed transformers has no ``model_type`` to compare with."""
    return pytest.mark.skipif(
        installed_model_type(model_type) is None, reason=missing_reference_reason(model_type)
    )


def reference_params(model_types: list[str]) -> list[object]:
    """``pytest.param`` per model type, each skipped where the installed transformers lacks it."""
    return [pytest.param(model_type, marks=requires_reference(model_type)) for model_type in model_types]
