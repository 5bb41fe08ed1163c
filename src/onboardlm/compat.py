"""The transformers releases onboardlm is tested against, and the warning for any other.

transformers is the reference implementation of every architecture, and its modules change between
releases (class names, where a scale is applied). ``scripts/compat.sh`` runs the generated-model and
onboarding tests on each release named in ``docs/compat.md``; this range spans them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

TESTED_TRANSFORMERS_LOWEST = Version("5.17.0")
TESTED_TRANSFORMERS_HIGHEST = Version("5.25.0")


def transformers_range_warning(installed: str | None = None) -> str | None:
    """One line when the installed transformers (or ``installed``) is outside the tested range, else None.

    Patch releases of the highest tested minor release count as tested.
    """
    if installed is None:
        try:
            installed = version("transformers")
        except PackageNotFoundError:
            return None
    found = Version(installed)
    highest = TESTED_TRANSFORMERS_HIGHEST
    if found >= TESTED_TRANSFORMERS_LOWEST and found.release[:2] <= highest.release[:2]:
        return None
    return (
        f"transformers {installed} is outside the range onboardlm is tested with "
        f"({TESTED_TRANSFORMERS_LOWEST}–{highest.major}.{highest.minor}.x); results may differ — "
        f'pip install "transformers>={TESTED_TRANSFORMERS_LOWEST},<{highest.major}.{highest.minor + 1}"'
    )
