"""The registry entries of an onboarded model in a TensorRT-LLM checkout.

``configs/<model>.yaml`` is the standalone config the seed's run and cookbook use with
``--args.yaml-extra``: the checkout's ``dashboard_default.yaml`` and ``world_size_N.yaml`` merged.
``models.yaml`` gets ``{name, [config_id,] yaml_extra: [dashboard_default.yaml, world_size_N.yaml,
<model>.yaml]}`` appended through the round-trip editor of :mod:`onboardlm.registry.editor`, so every
other byte, comment and the order stay; ``config_id`` only when the file's entries carry one.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from onboardlm.pr.layout import PrError, TrtllmCheckout
from onboardlm.pr.onboarded import OnboardedModel
from onboardlm.registry.editor import append_entry_text
from onboardlm.registry.errors import RegistryError
from onboardlm.registry.layout import DASHBOARD_DEFAULT, model_config_file, world_size_file
from onboardlm.registry.loader import deep_merge, load_yaml_file, parse_yaml_text


@dataclass(frozen=True)
class RegistryPlan:
    """What the PR changes in the checkout's registry, and why (for PR.md)."""

    note: str
    name: str | None = None
    config: str | None = None  # configs/<file>, written
    yaml_extra: tuple[str, ...] = ()
    files: dict[Path, str] = field(default_factory=dict)


def plan_registry(checkout: TrtllmCheckout, onboarded: OnboardedModel) -> RegistryPlan:
    name = onboarded.registered_as
    if name is None:
        return RegistryPlan("not registered: the onboarding names no hub checkpoint (no registry entry)")
    if onboarded.world_size is None:
        return RegistryPlan(f"not registered: report.json has no world size for {name}")
    models_file = checkout.models_yaml
    text = _read(models_file)
    models = _models(text, str(models_file))
    existing = next((m for m in models if str(m.get("name", "")).lower() == name.lower()), None)
    if existing is not None:
        return RegistryPlan(
            f"{existing['name']} is in models.yaml already (entry kept)", name=existing["name"]
        )

    config = model_config_file(name)
    config_path = checkout.configs_dir / config
    if config_path.exists():
        raise PrError(str(config_path), "exists already", "remove it or register the model by hand")
    ws_file = world_size_file(onboarded.world_size)
    sources = [checkout.configs_dir / DASHBOARD_DEFAULT, checkout.configs_dir / ws_file]
    merged: dict[str, Any] = {}
    for source in sources:
        if not source.is_file():
            raise PrError(str(source), "config file not found (the registry entry needs it)")
        try:
            merged = deep_merge(merged, load_yaml_file(source))
        except RegistryError as err:
            raise PrError(str(source), err.problem) from None
    standalone = (
        f"# Standalone AutoDeploy config for {name} (onboarded by onboardlm).\n"
        f"# {DASHBOARD_DEFAULT} + {ws_file} merged; run with:\n"
        f"#   python examples/auto_deploy/build_and_run_ad.py --model {name} "
        f"--args.yaml-extra {checkout.relative(config_path)}\n"
    ) + _block_yaml(merged)

    yaml_extra = (DASHBOARD_DEFAULT, ws_file, config)
    fields: dict[str, Any] = {"name": name}
    if models and "config_id" in models[-1]:
        fields["config_id"] = config.removesuffix(".yaml").replace("-", "_").replace(".", "_")
    fields["yaml_extra"] = list(yaml_extra)
    try:
        new_text = append_entry_text(text, fields, str(models_file))
    except RegistryError as err:
        raise PrError(str(models_file), err.problem) from None
    if _models(new_text, str(models_file)) != [*models, fields]:
        raise PrError(
            str(models_file), "internal check failed: the edit changed other entries; nothing written"
        )
    return RegistryPlan(
        f"added {name} (world size {onboarded.world_size}) to models.yaml with configs/{config}",
        name=name,
        config=config,
        yaml_extra=yaml_extra,
        files={models_file: new_text, config_path: standalone},
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PrError(str(path), f"cannot be read: {err}") from None


def _models(text: str, source: str) -> list[dict[str, Any]]:
    try:
        data = parse_yaml_text(text, source)
    except RegistryError as err:
        raise PrError(source, err.problem) from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise PrError(source, "expected a 'models' list of mappings at the top level")
    return [dict(m) for m in models]


def _block_yaml(data: dict[str, Any]) -> str:
    """``data`` as block-style YAML in its key order (the merged files' order), as TensorRT-LLM writes configs."""
    yaml = YAML(typ="rt")
    yaml.default_flow_style = False
    yaml.width = 4096
    stream = io.StringIO()
    yaml.dump(data, stream)
    return stream.getvalue()
