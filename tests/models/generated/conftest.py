"""Shipped generated tests on a transformers release other than the one they were generated with.

- A test module whose model type the installed transformers lacks is skipped, naming the release:
  without transformers' implementation there is no reference to compare with, and the lean file itself
  imports that release's config class (internlm3 is not in transformers 5.17).
- On a release other than the pinned one (the release every shipped file was generated and verified
  with), a module whose reference transformers itself cannot build from the test's config is skipped
  with transformers' error (``onboardlm.testing.reference.built_by_transformers``). On the pinned
  release that error fails the tests as usual.
- Also on other releases only, a reference measured to compute another function than the model does
  is skipped with the reason: before 5.2x transformers' Mamba2 gated RMSNorm normalised all groups at
  once (no ``group_size``), where Mamba2 itself and later releases normalise per group, as the lean
  file does; with more than one group the two differ, and the config cannot tell them apart. And
  transformers 5.17's Nemotron-H mixer clamps the time step at ``(time_step_min, inf)``, ignoring
  ``config.time_step_limit``, which later releases and the lean file follow (onboarding on 5.17
  refuses that mixer in one line for the same reason).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from onboardlm.onboard.analyze_hybrid import ignored_time_step_limit
from onboardlm.testing.reference import (
    built_by_transformers,
    installed_model_type,
    missing_reference_reason,
    on_pinned_release,
)


def ungrouped_gated_norm(reference: torch.nn.Module) -> str | None:
    """Why ``reference`` computes Mamba2's gated norm over all groups at once, or None."""
    for name, module in reference.named_modules():
        groups = getattr(reference.config, "n_groups", 1)
        if (
            type(module).__name__.endswith("RMSNormGated")
            and groups > 1
            and not hasattr(module, "group_size")
        ):
            return (
                f"transformers {transformers.__version__}'s {type(module).__name__} at {name} normalises "
                f"its {groups} groups at once; Mamba2 (and the lean file) normalises per group"
            )
    return None


def other_function(reference: torch.nn.Module) -> str | None:
    """Why ``reference`` computes another function than the model (and the lean file) does, or None."""
    reason = ungrouped_gated_norm(reference)
    if reason is not None:
        return reason
    named = getattr(reference.config, "time_step_limit", None)
    for name, module in reference.named_modules():
        ignored = ignored_time_step_limit(module, named)
        if ignored is not None:
            return f"{ignored} (at {name}); the lean file follows config.time_step_limit"
    return None


def model_type_of(path: Path) -> str:
    """``test_<model_type>_modeling.py`` -> ``<model_type>``."""
    return path.name.removeprefix("test_").removesuffix("_modeling.py")


class _ModuleWithoutReference(pytest.Module):
    """A test module collected as one skip instead of an import error."""

    def _getobj(self) -> object:
        pytest.skip(missing_reference_reason(model_type_of(self.path)), allow_module_level=True)


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if installed_model_type(model_type_of(module_path)) is not None:
        return None
    return _ModuleWithoutReference.from_parent(parent, path=module_path)


@pytest.fixture(scope="module", autouse=True)
def reference_builds_on_this_release(request: pytest.FixtureRequest) -> None:
    """Skip the module where a release other than the pinned one cannot build its reference."""
    make_reference = getattr(request.module, "make_reference", None)
    if make_reference is not None and not on_pinned_release():
        reason = other_function(built_by_transformers(make_reference))
        if reason is not None:
            pytest.skip(reason)
