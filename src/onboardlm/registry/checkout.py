"""Where the generated documentation and its inputs live in a source checkout.

The support matrix and the cookbook are committed files generated from other committed files (the
registry, the lean model files, the coverage sweep, the onboarding records), so they are made in a
checkout, not in an installed wheel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from onboardlm.errors import OnboardlmError


@dataclass(frozen=True)
class CheckoutLayout:
    """The files of one onboardlm checkout that the support matrix and the cookbook read and write."""

    root: Path

    @classmethod
    def at(cls, root: Path | str | None = None) -> CheckoutLayout:
        """The checkout at ``root`` (default: the one this package is imported from)."""
        path = Path(root).expanduser().resolve() if root is not None else Path(__file__).resolve().parents[3]
        if not (path / "pyproject.toml").is_file() or not (path / "src" / "onboardlm").is_dir():
            raise OnboardlmError(
                str(path),
                "not an onboardlm source checkout",
                "run it in a clone installed with `pip install -e .`",
            )
        return cls(path)

    @property
    def registry_dir(self) -> Path:
        return self.root / "src" / "onboardlm" / "registry"

    @property
    def custom_dir(self) -> Path:
        """The shipped lean model files, ``modeling_<type>.py``."""
        return self.root / "src" / "onboardlm" / "models" / "custom"

    @property
    def coverage_file(self) -> Path:
        """The committed sweep over transformers' causal-LM mapping (``benchmarks/coverage.py``)."""
        return self.root / "benchmarks" / "results" / "coverage.json"

    @property
    def sharding_test(self) -> Path:
        """The TP=2 vs TP=1 test; the lean files it loads are the ones tensor parallelism is tested on."""
        return self.root / "tests" / "transforms" / "test_sharding.py"

    @property
    def records_dir(self) -> Path:
        """One onboarding record per model onboarded into the package (``docs/onboarded/<slug>.json``)."""
        return self.root / "docs" / "onboarded"

    @property
    def matrix_file(self) -> Path:
        return self.root / "docs" / "support-matrix.md"

    @property
    def cookbook_dir(self) -> Path:
        return self.root / "examples" / "cookbook"
