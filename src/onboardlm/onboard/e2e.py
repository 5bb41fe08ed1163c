"""Phase 9: run the generated model end to end through onboardlm's runtime, reduced then full.

The generated file (not a shipped one) is imported for the run, so its registration is the one the
factory uses; the previous registrations come back afterwards. The reduced run overrides
``num_hidden_layers`` (a smoke test of loading, export, KV cache and decoding on real weights); the
full run follows when the checkpoint has weights and fits this machine. Settings come from the
registry entry when the model has one (``--use-registry``), else from the defaults.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from onboardlm.models.factory import AutoModelForCausalLMFactory, execute_model_file
from onboardlm.onboard.fit import FitReport
from onboardlm.onboard.resolve import ResolveResult
from onboardlm.onboard.result import PromptRecord
from onboardlm.registry.loader import load_run_settings
from onboardlm.runtime.runner import run_prompts

#: Layers of the reduced run, and tokens it generates per prompt.
REDUCED_LAYERS, REDUCED_NEW_TOKENS = 2, 8


@dataclass(frozen=True)
class E2EOutcome:
    runs: list[str]
    prompts: list[PromptRecord] = field(default_factory=list)
    not_done: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return "; ".join(self.runs)


def run_e2e(
    resolved: ResolveResult,
    fit: FitReport | None,
    model_file: Path,
    registered_as: str | None,
    registry_dir: Path | None = None,
) -> E2EOutcome:
    settings = load_run_settings(
        registered_as, use_registry=registered_as is not None, registry_dir=registry_dir
    )
    location = model_location(resolved)
    layers = min(REDUCED_LAYERS, resolved.source.config.num_hidden_layers)
    reduced = settings.model_copy(
        update={
            "model_kwargs": {**settings.model_kwargs, "num_hidden_layers": layers},
            "max_new_tokens": REDUCED_NEW_TOKENS,
        }
    )
    runs, not_done = [], []
    with lean_module_registered(model_file):
        reduced_results = run_prompts(location, None, reduced)
        runs.append(f"reduced run ({layers} layers): {len(reduced_results)} prompts answered")
        if fit is not None and fit.fits:
            prompts = _records(run_prompts(location, None, settings), "full")
            runs.append(f"full run: {len(prompts)} prompts answered")
        else:
            prompts = _records(reduced_results, f"reduced ({layers} layers)")
            not_done.append("e2e: full run skipped, the model does not fit this machine")
    return E2EOutcome(runs, prompts, not_done)


def uncached_stateful_ops(model_file: Path) -> list[str]:
    """Canonical ops the model file calls that carry state across tokens and that the runtime's
    cache transform cannot cache yet (``transforms.kv_cache._STATEFUL_OPS``): decoding would fail."""
    from onboardlm.transforms import kv_cache

    text = model_file.read_text()
    return [op for op in getattr(kv_cache, "_STATEFUL_OPS", ()) if re.search(rf"\.{op}\(", text)]


def model_location(resolved: ResolveResult) -> str:
    """What the factory should load: the GGUF file, the local folder, or the hub id."""
    source = resolved.source
    if source.kind == "gguf" and source.weights is not None:
        return str(source.weights.files[0])
    if source.kind == "directory" and source.directory is not None:
        return str(source.directory)
    return source.name


def _records(results: list, run: str) -> list[PromptRecord]:  # noqa: ANN001 - runtime PromptResult
    return [PromptRecord(r.index, r.prompt, r.output, run) for r in results]


@contextmanager
def lean_module_registered(model_file: Path) -> Iterator[ModuleType]:
    """Import ``model_file`` (its last line registers it) and undo the registration afterwards."""
    name = f"_onboardlm_generated_{model_file.stem}"
    try:
        with AutoModelForCausalLMFactory.registrations_restored():
            yield execute_model_file(model_file, name)
    finally:
        sys.modules.pop(name, None)
