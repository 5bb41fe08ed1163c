"""Export a model to a ``torch.fx.GraphModule`` with torch.export (non-strict, dynamic shapes)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule
from torch.utils.hooks import RemovableHandle

#: Sequence lengths the exported graph accepts; batch up to MAX_BATCH.
MAX_SEQ_LEN = 1 << 16
MAX_BATCH = 1 << 12


def torch_export_to_gm(
    model: nn.Module,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
    *,
    strict: bool = False,
) -> GraphModule:
    """Export ``model`` called as ``model(*args, **kwargs)`` to a GraphModule.

    The GraphModule keeps the model's parameter names (so checkpoints load into it) and carries the
    model's load-state-dict pre- and post-hooks on the matching submodules, so a checkpoint in a
    different layout (e.g. packed experts) loads into the graph the same way it loads into the model.
    """
    with torch.inference_mode(False), torch.no_grad():
        program = torch.export.export(
            model, tuple(args), kwargs=dict(kwargs or {}), dynamic_shapes=dynamic_shapes, strict=strict
        )
    gm = program.module()
    carry_load_hooks(model, gm)
    return gm


def carry_load_hooks(source: nn.Module, target: nn.Module) -> int:
    """Copy load-state-dict pre-hooks from ``source``'s submodules to ``target``'s of the same name.

    Returns the number of hooks copied. A hook whose module the export folded away goes to the
    closest surviving ancestor, called with the prefix its own module would have had.
    """
    target_modules = dict(target.named_modules())
    copied = 0
    for name, module in source.named_modules():
        for hook in list(module._load_state_dict_pre_hooks.values()):
            holder_name = _closest_name(target_modules, name)
            holder = target_modules[holder_name]
            suffix = name[len(holder_name) :].lstrip(".")
            handle = RemovableHandle(holder._load_state_dict_pre_hooks)
            holder._load_state_dict_pre_hooks[handle.id] = (
                _with_prefix_suffix(hook, suffix) if suffix else hook
            )
            copied += 1
    return copied


def _closest_name(modules: dict[str, nn.Module], name: str) -> str:
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def _with_prefix_suffix(hook: Callable[..., Any], suffix: str) -> Callable[..., Any]:
    def shifted(state_dict: dict[str, Any], prefix: str, *rest: Any) -> Any:
        return hook(state_dict, f"{prefix}{suffix}.", *rest)

    return shifted


def causal_lm_dynamic_shapes() -> dict[str, dict[int, Dim]]:
    """Dynamic batch and sequence for ``forward(input_ids, position_ids)`` keyword inputs."""
    batch = Dim("batch", min=1, max=MAX_BATCH)
    seq = Dim("seq", min=1, max=MAX_SEQ_LEN)
    return {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}}
