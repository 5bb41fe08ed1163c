"""Tests that need transformers' implementation of a model type skip where the release lacks it, or,
on a release other than the pinned one, where that release cannot build it from the test's config."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
import transformers
from packaging.version import Version
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from onboardlm.compat import TESTED_TRANSFORMERS_HIGHEST

T = TypeVar("T")


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


def on_pinned_release() -> bool:
    """Whether the installed transformers is the pinned release (``constraints.txt``), the one every
    shipped file was generated and verified with."""
    return Version(transformers.__version__) == TESTED_TRANSFORMERS_HIGHEST


def built_by_transformers(build: Callable[[], T]) -> T:
    """``build()`` (a transformers constructor or an analysis that runs one). On a release other than
    the pinned one, a failure skips the test, naming the release and transformers' error (Cohere-Compass's
    rotary on 5.17 needs a head_dim of at least 128); on the pinned release it fails as usual."""
    if on_pinned_release():
        return build()
    try:
        return build()
    except Exception as error:  # transformers' own failure, reported in the skip
        first_line = str(error).splitlines()[0] if str(error) else ""
        pytest.skip(
            f"transformers {transformers.__version__} cannot build this test's reference "
            f"({type(error).__name__}: {first_line[:200]})"
        )
