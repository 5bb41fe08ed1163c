"""Record what a model passes to its submodules during one forward.

Equivalence tests feed a lean block exactly the inputs its HuggingFace counterpart received inside
the full model (hidden states, the ``position_embeddings`` object, masks) and compare with exactly
what it returned, so no test has to rebuild masks, rotary tables or per-layer-type arguments.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from onboardlm.errors import OnboardlmError

__all__ = ["Call", "cos_sin_tables", "first_tensor", "record_calls", "text_positions"]


def text_positions(call: Call) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A rotary module's recorded (args, kwargs) with multi-axis (M-RoPE) ``position_ids``
    ``[axes, B, S]`` that agree on every axis, as text positions are, given as the ``[B, S]`` ids
    lean files take; any other call unchanged."""

    def text(value: Any) -> Any:
        multi_axis = isinstance(value, torch.Tensor) and value.dim() == 3 and not value.is_floating_point()
        return value[0] if multi_axis and bool((value == value[:1]).all()) else value

    args = tuple(text(a) if i == 1 else a for i, a in enumerate(call.args))
    kwargs = {k: text(v) if k == "position_ids" else v for k, v in call.kwargs.items()}
    return args, kwargs


def cos_sin_tables(tables: Any) -> Any:
    """RoPE tables as lean files take them: a complex ``freqs_cis`` table (DeepSeek-V2's, Llama 4's: one
    complex number per channel pair) becomes the (cos, sin) NeoX-halves tables it stands for; any other
    value is returned unchanged."""
    if isinstance(tables, torch.Tensor) and tables.is_complex():
        return torch.cat((tables.real, tables.real), dim=-1), torch.cat((tables.imag, tables.imag), dim=-1)
    return tables


@dataclass(frozen=True)
class Call:
    """One call of a submodule: its positional and keyword arguments and its output (detached copies)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any

    @property
    def hidden_states(self) -> torch.Tensor:
        """The block's main input: the first positional argument, else the ``hidden_states`` keyword."""
        if self.args:
            return self.args[0]
        if "hidden_states" in self.kwargs:
            return self.kwargs["hidden_states"]
        raise KeyError(f"no positional argument and no 'hidden_states' keyword among {sorted(self.kwargs)}")

    @property
    def position_embeddings(self) -> Any:
        """The ``position_embeddings`` keyword as passed (usually a (cos, sin) tuple; a complex table as
        its cos/sin tables), None if absent."""
        return cos_sin_tables(self.kwargs.get("position_embeddings"))

    @property
    def position_ids(self) -> Any:
        """The ``position_ids`` keyword as passed, None if absent."""
        return self.kwargs.get("position_ids")

    def argument(self, name: str, position: int) -> Any:
        """An argument as passed: the ``name`` keyword, else the positional argument at ``position``
        (counted without ``self``), else None (Gemma 4's ``per_layer_input`` of a decoder layer)."""
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[position] if position < len(self.args) else None

    @property
    def result(self) -> torch.Tensor:
        """The output tensor; for tuple outputs (attention weights, router logits) the first element."""
        return first_tensor(self.output)


def first_tensor(output: Any) -> torch.Tensor:
    """``output`` itself if it is a tensor, else the first element of a tuple/list or ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):  # ModelOutput is an OrderedDict of its non-None fields
        output = tuple(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"output of type {type(output).__name__} does not start with a tensor")


def _detached(value: Any) -> Any:
    """A copy of ``value`` that later in-place updates of the model cannot change."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_detached(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {key: _detached(v) for key, v in value.items()}
    return value


def missing_paths(model: nn.Module, paths: Iterable[str]) -> list[str]:
    """The submodule paths of ``paths`` that ``model`` does not have (an older transformers release
    lays the model out otherwise: GPT-J's rotary module lived inside its attention before 5.2x)."""
    missing = []
    for path in paths:
        try:
            model.get_submodule(path)
        except AttributeError:
            missing.append(path)
    return missing


def record_calls(model: nn.Module, paths: Iterable[str], **inputs: Any) -> dict[str, list[Call]]:
    """Run ``model(**inputs)`` once without gradients and return every call of each submodule path.

    Each path maps to the list of its calls in order (empty when the forward never called it). An
    unknown path raises ``OnboardlmError`` before anything runs; the hooks are always removed.
    """
    paths = list(dict.fromkeys(paths))
    modules = {}
    for path in paths:
        try:
            modules[path] = model.get_submodule(path)
        except AttributeError as err:
            raise OnboardlmError(
                path, f"no such submodule in {type(model).__name__}", "use a name from named_modules()"
            ) from err
    calls: dict[str, list[Call]] = {path: [] for path in paths}
    pending: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {path: [] for path in paths}
    handles = []
    for path, module in modules.items():

        def before(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], path: str = path) -> None:
            pending[path].append((_detached(args), _detached(kwargs)))

        def after(_: nn.Module, args: Any, kwargs: Any, output: Any, path: str = path) -> None:
            call_args, call_kwargs = pending[path].pop()
            calls[path].append(Call(call_args, call_kwargs, _detached(output)))

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls
