"""``--into-package``: put a generated model and its test into the onboardlm source tree.

The model goes to ``src/onboardlm/models/custom/modeling_<type>.py`` (and is imported by that
package's ``__init__``, which is rewritten from the files present), the test to
``tests/models/generated/test_<type>_modeling.py``. This needs a source checkout (an editable install).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onboardlm.models.custom as custom_package
from onboardlm.errors import OnboardlmError
from onboardlm.onboard.staging import OutputExists
from onboardlm.registry.atomic import atomic_write_text


@dataclass(frozen=True)
class PackageTargets:
    model_file: Path
    test_file: Path

    @staticmethod
    def checkout_root(custom_dir: Path | None = None) -> Path:
        """The source checkout holding ``custom_dir`` (the installed custom package by default)."""
        custom_dir = custom_dir or Path(custom_package.__file__).parent
        root = custom_dir.parents[3]  # src/onboardlm/models/custom -> the checkout
        if not (root / "pyproject.toml").is_file() or not (root / "tests").is_dir():
            raise OnboardlmError(
                str(custom_dir),
                "not inside a source checkout",
                "--into-package needs `pip install -e` of a clone",
            )
        return root

    @classmethod
    def for_model_type(cls, model_type: str, custom_dir: Path | None = None) -> PackageTargets:
        custom_dir = custom_dir or Path(custom_package.__file__).parent
        root = cls.checkout_root(custom_dir)
        stem = model_type.replace("-", "_")
        return cls(
            custom_dir / f"modeling_{stem}.py",
            root / "tests" / "models" / "generated" / f"test_{stem}_modeling.py",
        )

    def check(self, force: bool) -> None:
        for path in (self.model_file, self.test_file):
            if path.exists() and not force:
                raise OutputExists(str(path), "already exists", "pass --force to replace it")

    def install(self, model_text: str, test_text: str) -> list[Path]:
        """Write both files and refresh the custom package's imports; return the paths written."""
        atomic_write_text(self.model_file, model_text)
        self.test_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.test_file, test_text)
        init = self.model_file.parent / "__init__.py"
        atomic_write_text(init, render_custom_init(sorted(p.stem for p in init.parent.glob("modeling_*.py"))))
        return [self.model_file, self.test_file, init]


def render_custom_init(modules: list[str]) -> str:
    """The ``__init__`` of ``onboardlm.models.custom``: import every model module (import = registration).

    A module whose config class the installed transformers lacks (an older release) is skipped.
    """
    names = "".join(f'    "{name}",\n' for name in modules)
    return (
        '"""Lean model files; importing one registers it with AutoModelForCausalLMFactory.\n\n'
        "A model whose config class the installed transformers lacks is skipped (logged at debug level).\n"
        '"""\n\n'
        "import importlib\n"
        "import logging\n\n"
        f"MODEL_MODULES = [\n{names}]\n\n"
        "for _name in MODEL_MODULES:\n"
        "    try:\n"
        '        importlib.import_module(f"{__name__}.{_name}")\n'
        "    except ImportError as _err:\n"
        '        logging.getLogger(__name__).debug("skipped %s: %s", _name, _err)\n'
    )
