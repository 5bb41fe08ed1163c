"""A private copy of the shipped registry for every test: tests never touch the installed one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from onboardlm.registry import shipped_registry_dir


@pytest.fixture
def registry_dir(tmp_path: Path) -> Path:
    root = tmp_path / "registry"
    (root / "configs").mkdir(parents=True)
    shipped = shipped_registry_dir()
    shutil.copy2(shipped / "models.yaml", root / "models.yaml")
    for path in (shipped / "configs").glob("*.yaml"):
        shutil.copy2(path, root / "configs" / path.name)
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), to prove that nothing changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
