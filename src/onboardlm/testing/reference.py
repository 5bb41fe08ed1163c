"""Tests that need transformers' implementation of a model type skip where the release lacks it."""

from __future__ import annotations

import pytest
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES


def requires_reference(model_type: str) -> pytest.MarkDecorator:
    """Skip, naming the release, when the installed transformers has no ``model_type`` to compare with."""
    return pytest.mark.skipif(
        model_type not in CONFIG_MAPPING_NAMES,
        reason=f"transformers {transformers.__version__} has no {model_type} (the reference implementation)",
    )


def reference_params(model_types: list[str]) -> list[object]:
    """``pytest.param`` per model type, each skipped where the installed transformers lacks it."""
    return [pytest.param(model_type, marks=requires_reference(model_type)) for model_type in model_types]
