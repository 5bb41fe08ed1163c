"""Hyper-connections, measured: decoder layers that carry several residual streams.

DeepSeek-V4, HY-V4 and Qwen4-Exp widen the residual into ``n`` parallel streams that learned,
input-dependent weights mix before and after every block (and a head folds them back before the final
norm). The layers then receive a hidden state of shape ``[B, S, n, hidden]`` (or ``[B, S, n * hidden]``)
instead of ``[B, S, hidden]``: one recorded forward of the tiny model shows it, whatever the modules
are called. No template carries several streams, so such a model is refused with that reason instead
of with the first module the analyzer does not recognise.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from onboardlm.errors import UnsupportedFeature

__all__ = ["hyper_connection_refusal"]

_HINT = "a template that keeps several residual streams and their mixing weights (hyper-connections)"


def _layer_stack(model: nn.Module, layers: int) -> tuple[str, nn.ModuleList] | None:
    return next(
        (
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) == layers and name
        ),
        None,
    )


def hyper_connection_refusal(model: nn.Module, config: PretrainedConfig) -> UnsupportedFeature | None:
    """The refusal for a model whose decoder layers receive several residual streams, else None."""
    hidden, layers = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
    found = _layer_stack(model, layers) if isinstance(layers, int) and layers > 0 else None
    if found is None or not isinstance(hidden, int):
        return None
    name, stack = found
    shapes: list[tuple[int, ...]] = []

    def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        value = args[0] if args else kwargs.get("hidden_states")
        if isinstance(value, torch.Tensor) and not shapes:
            shapes.append(tuple(value.shape))

    hook = stack[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 3, dtype=torch.long))
    except Exception:  # noqa: BLE001 - no recorded forward, no evidence either way
        return None
    finally:
        hook.remove()
    if not shapes or shapes[0][:2] != (1, 3):
        return None
    streams = shapes[0][2:]
    if streams == (hidden,):
        return None
    if len(streams) == 2 and streams[1] == hidden and streams[0] > 1:
        count = streams[0]
    elif len(streams) == 1 and streams[0] % hidden == 0 and streams[0] > hidden:
        count = streams[0] // hidden
    else:
        return None
    return UnsupportedFeature(
        f"{name}.0",
        f"hyper-connections: the decoder layers carry {count} residual streams (hidden state "
        f"{list(shapes[0])} for hidden_size {hidden}) mixed by learned weights around every block",
        _HINT,
    )
