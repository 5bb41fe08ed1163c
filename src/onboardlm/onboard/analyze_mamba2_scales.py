"""Measure what a Mamba2 mixer adds around the plain SSD path (Falcon-H1's ``FalconH1Mixer``).

* a scalar multiplier on the mixer input (``hidden * ssm_in_multiplier`` before ``in_proj``): the
  ratio of ``in_proj``'s input to the mixer's, read with a pre-hook, matched to a config float and
  confirmed on the mixer rebuilt with that field changed;
* a fixed per-channel vector scaling ``in_proj``'s output (µP ``mup_vector``): a float buffer of the
  projection's width, constant on each segment ``gate | x | B | C | dt``; each constant is matched to a
  config float (or a float list's entry) and confirmed on the model rebuilt with those fields changed;
* a gated norm that a config switch drops (``mamba_rms_norm``: ``silu(gate) * y`` without it): the bool
  field whose flip adds the norm to the rebuilt mixer.

Each returns config expressions for the template; the mixer's output is checked against the
canonical ops with the measured values afterwards (``analyze_hybrid._check_mamba2``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from onboardlm.errors import UnsupportedFeature

if TYPE_CHECKING:
    from onboardlm.onboard.analyze import _Analyzer

_HINT = "add a template for it in onboardlm/onboard/templates and teach analyze_mamba2_scales.py about it"


@dataclass(frozen=True)
class Mamba2Scales:
    """Measured multipliers of a Mamba2 mixer (the values the probes apply): on its input, and one per
    in_proj segment (empty: none)."""

    in_scale: float = 1.0
    segments: tuple[float, ...] = ()


class _Stop(Exception):
    """Raised by the probe hook once ``in_proj``'s input is read."""


def float_candidates(fields: dict[str, Any]) -> list[tuple[str, str, int | None, float]]:
    """(expression, field, list index, value) of every float field and float list entry."""
    found = []
    for name, value in fields.items():
        if isinstance(value, float) and not isinstance(value, bool):
            found.append((f"config.{name}", name, None, value))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, float) for v in value):
            found += [(f"config.{name}[{i}]", name, i, v) for i, v in enumerate(value)]
    return found


def _matching(fields: dict[str, Any], value: float) -> list[tuple[str, str, int | None, float]]:
    return [c for c in float_candidates(fields) if abs(c[3] - value) <= 1e-6 * max(1.0, abs(value))]


def _input_ratio(mixer: nn.Module, in_name: str, hidden: int) -> float | None:
    """``s`` with ``in_proj``'s input equal to ``s`` times the mixer's input, else None."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0].detach())
        raise _Stop

    x = torch.randn(2, 5, hidden, generator=torch.Generator().manual_seed(6))
    handle = getattr(mixer, in_name).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            mixer(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        return None
    got = seen[0].double()
    scale = float((got * x.double()).sum() / (x.double() ** 2).sum())
    return scale if torch.allclose(got, scale * x.double(), atol=1e-6, rtol=1e-5) else None


def _rebuilt_mixer(an: _Analyzer, mixer: nn.Module, index: int, **changes: Any) -> nn.Module | None:
    """``mixer`` rebuilt (fp32, eval) from the tiny config with the fields ``changes`` set, or None when
    the config or the module refuses the change (which then tells nothing)."""
    from onboardlm.onboard.analyze_hybrid import _rebuild

    config = copy.deepcopy(an.tiny)
    try:
        for name, value in changes.items():
            setattr(config, name, value)
        return _rebuild(mixer, config, index).float().eval()
    except Exception:  # noqa: BLE001 - a change the config or the module refuses tells nothing
        return None


def input_scale(
    an: _Analyzer, mixer: nn.Module, index: int, in_name: str, path: str
) -> tuple[float, str | None]:
    """The scalar multiplier on the mixer's input and its config expression (None for 1)."""
    ratio = _input_ratio(mixer, in_name, an.hidden)
    if ratio is None:
        raise UnsupportedFeature(
            f"{path}.{in_name}", "in_proj reads something else than the scaled mixer input", _HINT
        )
    if abs(ratio - 1.0) < 1e-6:
        return 1.0, None
    for expression, name, position, value in _matching(an.fields, ratio):
        if position is not None:
            continue
        rebuilt = _rebuilt_mixer(an, mixer, index, **{name: value * 1.7 + 0.05})
        if rebuilt is None:
            continue
        changed = _input_ratio(rebuilt, in_name, an.hidden)
        if changed is not None and abs(changed - (value * 1.7 + 0.05)) < 1e-5:
            return ratio, expression
    raise UnsupportedFeature(f"{path}.{in_name}", f"input multiplier {ratio:.6g} from no config field", _HINT)


def _scale_buffer(mixer: nn.Module, width: int) -> tuple[str, torch.Tensor] | None:
    found = [
        (n, b)
        for n, b in mixer.named_buffers(recurse=False)
        if b.is_floating_point() and b.numel() > 1 and b.shape[-1] == width and b.numel() == width
    ]
    return found[0] if len(found) == 1 else None


def segment_scales(
    an: _Analyzer, mixer: nn.Module, path: str, width: int, sizes: list[int]
) -> tuple[tuple[float, ...], tuple[str, ...]]:
    """The constants of a per-channel buffer scaling ``in_proj``'s output, one per segment, and their
    config expressions; empty when the mixer holds none."""
    others = sorted(
        n for n, b in mixer.named_buffers(recurse=False) if b.is_floating_point() and b.numel() > 1
    )
    buffer = _scale_buffer(mixer, width)
    if buffer is None:
        if others:
            raise UnsupportedFeature(
                path, f"Mamba2 mixer with buffers {others} the template does not read", _HINT
            )
        return (), ()
    name, vector = buffer
    values = []
    for piece in vector.reshape(-1).split(sizes):
        if not torch.all(piece == piece[0]):
            raise UnsupportedFeature(
                f"{path}.{name}", "a projection scale not constant on each segment", _HINT
            )
        values.append(float(piece[0]))
    expressions = []
    for value in values:
        matches = _matching(an.fields, value)
        if not matches:
            raise UnsupportedFeature(
                f"{path}.{name}", f"segment scale {value:.6g} from no config field", _HINT
            )
        expressions.append(matches[0])
    _confirm_segments(an, path, name, [e for e in expressions], sizes)
    return tuple(values), tuple(e[0] for e in expressions)


def _confirm_segments(
    an: _Analyzer, path: str, buffer: str, found: list[tuple[str, str, int | None, float]], sizes: list[int]
) -> None:
    """Rebuild the model with each matched field (entry) at a new value; its buffer must follow."""
    config = copy.deepcopy(an.tiny)
    for offset, (_, name, position, value) in enumerate(found):
        new = value * 1.5 + 0.01 * (offset + 1)
        if position is None:
            setattr(config, name, new)
        else:
            entries = list(getattr(config, name))
            entries[position] = new
            setattr(config, name, entries)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        vector = model.get_submodule(path).get_buffer(buffer)
    except Exception as err:  # noqa: BLE001 - the rebuilt model must tell
        raise UnsupportedFeature(
            f"{path}.{buffer}", f"projection scale not rebuilt from the config ({err})", _HINT
        ) from err
    for (expression, *_), piece in zip(found, vector.reshape(-1).split(sizes), strict=True):
        expected = eval(expression, {"config": config})  # noqa: S307 - our own config expression
        if not torch.allclose(piece, torch.full_like(piece, float(expected))):
            raise UnsupportedFeature(
                f"{path}.{buffer}", f"segment scale does not follow {expression} when it changes", _HINT
            )


def norm_switch(
    an: _Analyzer, mixer: nn.Module, index: int, has_norm: Any
) -> tuple[nn.Module, str | None] | None:
    """A mixer with its gated norm and the config expression that keeps it (None: always there): the
    mixer itself when it holds one and no bool field drops it, else the mixer rebuilt with the bool
    field that adds it flipped (its weights and buffers copied where the shapes agree). None when no
    flip gives one."""
    present = has_norm(mixer)
    for name, value in an.fields.items():
        if not isinstance(value, bool):
            continue
        rebuilt = _rebuilt_mixer(an, mixer, index, **{name: not value})
        if rebuilt is None or has_norm(rebuilt) == present:
            continue
        with_norm = mixer if present else _with_state_of(rebuilt, mixer)
        keeps = f"config.{name}" if (present == value) else f"not config.{name}"
        return with_norm, keeps
    return (mixer, None) if present else None


def _with_state_of(rebuilt: nn.Module, mixer: nn.Module) -> nn.Module:
    """``rebuilt`` holding ``mixer``'s parameters and buffers (shapes agreeing) and its missing buffers."""
    state = dict(mixer.named_parameters()) | dict(mixer.named_buffers())
    with torch.no_grad():
        for name, tensor in list(rebuilt.named_parameters()) + list(rebuilt.named_buffers()):
            if name in state and state[name].shape == tensor.shape:
                tensor.copy_(state[name])
    for name, buffer in mixer.named_buffers(recurse=False):
        if name not in dict(rebuilt.named_buffers(recurse=False)):
            rebuilt.register_buffer(name, buffer.clone(), persistent=False)
    return rebuilt


def order_switch(
    an: _Analyzer, mixer: nn.Module, index: int, keeps_norm: str | None, before: bool, order_of: Any
) -> str | None:
    """The bool field (other than the norm's own switch) whose flip swaps gating before/after the norm
    (``before`` measured on the tiny config): ``order_of(module)`` gives the order the rebuilt mixer
    matches the template with (None for neither). None when no field flips it."""
    switch = keeps_norm.removeprefix("not ").removeprefix("config.") if keeps_norm else None
    for name, value in an.fields.items():
        if not isinstance(value, bool) or name == switch:
            continue
        keep_norm = {switch: not keeps_norm.startswith("not ")} if switch else {}  # type: ignore[union-attr]
        rebuilt = _rebuilt_mixer(an, mixer, index, **keep_norm, **{name: not value})
        if rebuilt is None:
            continue
        try:
            flipped = order_of(_with_state_of(rebuilt, mixer))
        except Exception:  # noqa: BLE001 - a mixer the template's orders cannot run tells nothing
            continue
        if flipped is not None and flipped != before:
            return f"config.{name}" if before == value else f"not config.{name}"
    return None
