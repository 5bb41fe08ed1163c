"""The output folder of an onboarding: built in a temporary sibling folder, moved into place at the end.

Nothing half-written is ever visible at the destination: either the old folder (or nothing) is
there, or the complete new one. An existing destination is replaced only with ``force``.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from onboardlm.errors import OnboardlmError

DEFAULT_ROOT = Path("onboarded")


class OutputExists(OnboardlmError):
    """The output folder exists and ``--force`` was not given."""


def output_name(model_name: str) -> str:
    """A folder name for a model: ``Qwen/Qwen3-8B`` -> ``Qwen__Qwen3-8B``; paths keep their last part."""
    base = model_name.rstrip("/")
    if base.startswith((".", "/", "~")) or Path(base).suffix == ".gguf":
        base = Path(base).name.removesuffix(".gguf")
    return re.sub(r"[^A-Za-z0-9._-]+", "__", base).strip("_") or "model"


def check_destination(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not force:
        raise OutputExists(str(out_dir), "output folder already exists", "pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExists(str(out_dir), "exists and is not a folder", "choose another --out")


class StagingFolder:
    """A temporary folder next to ``destination``; :meth:`publish` moves it into place."""

    def __init__(self, destination: Path) -> None:
        self.destination = destination
        destination.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))

    def publish(self) -> Path:
        """Replace the destination with the staged folder (the old one is removed only afterwards)."""
        backup = None
        if self.destination.exists():
            backup = self.destination.with_name(f".{self.destination.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            self.destination.rename(backup)
        self.path.rename(self.destination)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        return self.destination

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
