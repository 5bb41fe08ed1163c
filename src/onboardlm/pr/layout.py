"""Where an onboarded model goes in a TensorRT-LLM source checkout."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from onboardlm.errors import OnboardlmError

CUSTOM_MODELS = Path("tensorrt_llm/_torch/auto_deploy/models/custom")
MODEL_TESTS = Path("tests/unittest/_torch/auto_deploy/unit/singlegpu/models")
TEST_UTILS = Path("tests/unittest/_torch/auto_deploy/_utils_test")
REGISTRY = Path("examples/auto_deploy/model_registry")
#: The shared test helper of TensorRT-LLM that the rewritten tests import ``assert_rmse_close`` from.
MODEL_TEST_UTILS = "_model_test_utils"
#: The helper module ``onboardlm pr`` writes next to it (generated from onboardlm's testing helpers).
LEAN_TEST_UTILS = "_lean_model_test_utils"


class PrError(OnboardlmError):
    """An onboarding output, checkout, branch or file that ``onboardlm pr`` cannot use."""


@dataclass(frozen=True)
class TrtllmCheckout:
    """The paths of one TensorRT-LLM checkout that ``onboardlm pr`` reads and writes."""

    root: Path

    @classmethod
    def at(cls, root: Path) -> TrtllmCheckout:
        """The checkout at ``root``; refuses a folder without TensorRT-LLM's layout, naming what is missing."""
        root = Path(root).expanduser().resolve()
        if not root.is_dir():
            raise PrError(str(root), "checkout folder not found")
        checkout = cls(root)
        for required in (
            checkout.custom_init,
            checkout.models_tests_dir,
            checkout.model_test_utils,
            checkout.models_yaml,
            checkout.configs_dir,
        ):
            if not required.exists():
                raise PrError(
                    str(root),
                    f"not a TensorRT-LLM checkout: {required.relative_to(root)} is missing",
                )
        if "assert_rmse_close" not in _top_level_names(checkout.model_test_utils):
            raise PrError(
                str(checkout.model_test_utils), "defines no assert_rmse_close (the rewritten tests import it)"
            )
        return checkout

    @property
    def custom_dir(self) -> Path:
        return self.root / CUSTOM_MODELS

    @property
    def custom_init(self) -> Path:
        return self.custom_dir / "__init__.py"

    @property
    def models_tests_dir(self) -> Path:
        return self.root / MODEL_TESTS

    @property
    def test_utils_dir(self) -> Path:
        return self.root / TEST_UTILS

    @property
    def model_test_utils(self) -> Path:
        return self.test_utils_dir / f"{MODEL_TEST_UTILS}.py"

    @property
    def lean_test_utils(self) -> Path:
        return self.test_utils_dir / f"{LEAN_TEST_UTILS}.py"

    @property
    def registry_dir(self) -> Path:
        return self.root / REGISTRY

    @property
    def models_yaml(self) -> Path:
        return self.registry_dir / "models.yaml"

    @property
    def configs_dir(self) -> Path:
        return self.registry_dir / "configs"

    def model_file(self, module: str) -> Path:
        return self.custom_dir / f"{module}.py"

    def test_file(self, name: str) -> Path:
        return self.models_tests_dir / name

    def relative(self, path: Path) -> str:
        """``path`` relative to the checkout root, with forward slashes (as git names it)."""
        return path.relative_to(self.root).as_posix()


def _top_level_names(path: Path) -> set[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, SyntaxError) as err:
        raise PrError(str(path), f"cannot be read as Python: {err}") from None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names
