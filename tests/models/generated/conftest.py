"""A shipped generated test whose model type the installed transformers lacks is skipped, naming the
release: without transformers' implementation there is no reference to compare with, and the
lean file itself imports that release's config class (internlm3 is not in transformers 5.17)."""

from __future__ import annotations

from pathlib import Path

import pytest

from onboardlm.testing.reference import installed_model_type, missing_reference_reason


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
