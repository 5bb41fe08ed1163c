"""Where a registry lives on disk: ``models.yaml`` plus ``configs/*.yaml`` in one directory."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from onboardlm.registry.errors import RegistryError

MODELS_FILE = "models.yaml"
CONFIGS_DIR = "configs"
DASHBOARD_DEFAULT = "dashboard_default.yaml"
WORLD_SIZE_PATTERN = re.compile(r"^world_size_(\d+)\.yaml$")


def shipped_registry_dir() -> Path:
    """The registry installed with the package (next to this module)."""
    return Path(__file__).resolve().parent


def world_size_file(world_size: int) -> str:
    """The config file that sets ``world_size``, e.g. ``world_size_2.yaml``."""
    return f"world_size_{world_size}.yaml"


def model_config_file(model_name: str) -> str:
    """The conventional per-model config name: ``org/Some_Model-7B`` -> ``some_model-7b.yaml``."""
    base = model_name.rstrip("/").rsplit("/", 1)[-1].lower()
    slug = re.sub(r"[^a-z0-9._-]+", "-", base).strip("-.")
    return f"{slug or 'model'}.yaml"


@dataclass(frozen=True)
class RegistryLayout:
    """The files of one registry directory."""

    root: Path

    @classmethod
    def at(cls, registry_dir: Path | str | None = None) -> RegistryLayout:
        """The layout of ``registry_dir`` (default: the shipped registry); it must hold ``models.yaml``."""
        root = Path(registry_dir).expanduser() if registry_dir is not None else shipped_registry_dir()
        if not root.is_dir():
            raise RegistryError(str(root), "registry directory not found")
        if not (root / MODELS_FILE).is_file():
            raise RegistryError(str(root), f"not a registry directory: no {MODELS_FILE} in it")
        return cls(root)

    @property
    def models_file(self) -> Path:
        return self.root / MODELS_FILE

    @property
    def configs_dir(self) -> Path:
        return self.root / CONFIGS_DIR

    def config(self, name: str) -> Path:
        """The path of config file ``name`` (a bare file name under ``configs/``)."""
        return self.configs_dir / name
