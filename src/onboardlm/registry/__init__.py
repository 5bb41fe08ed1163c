"""The model registry: ``models.yaml`` + ``configs/*.yaml``, a deep-merge loader, a validator and a safe editor."""

from onboardlm.registry.editor import AddResult, add_entry, parse_param_count, world_size_for_params
from onboardlm.registry.errors import RegistryError
from onboardlm.registry.layout import RegistryLayout, model_config_file, shipped_registry_dir
from onboardlm.registry.loader import (
    ExplainedSettings,
    RegistryEntry,
    deep_merge,
    explain_settings,
    find_entry,
    load_run_settings,
    load_yaml_file,
    merged_settings,
    read_entries,
    render_standalone_yaml,
    settings_for_model,
    standalone_yaml,
)
from onboardlm.registry.settings import RunSettings, SamplingSettings
from onboardlm.registry.validator import Problem, has_errors, validate_registry

__all__ = [
    "AddResult",
    "ExplainedSettings",
    "Problem",
    "RegistryEntry",
    "RegistryError",
    "RegistryLayout",
    "RunSettings",
    "SamplingSettings",
    "add_entry",
    "deep_merge",
    "explain_settings",
    "find_entry",
    "has_errors",
    "load_run_settings",
    "load_yaml_file",
    "merged_settings",
    "model_config_file",
    "parse_param_count",
    "read_entries",
    "render_standalone_yaml",
    "settings_for_model",
    "shipped_registry_dir",
    "standalone_yaml",
    "validate_registry",
    "world_size_for_params",
]
