"""Measure hybrid stacks: decoder layers whose token mixer is an SSM (or another non-attention mixer).

``analyze`` hands a stack over here when its layers are of different classes, or when some layer's
token mixer is not attention. Every layer is read from the built model, never from names:

* each child of a layer is classified by what it is (``block_kind``): a token mixer recognised by
  ``MIXER_RECOGNISERS`` (a Mamba2 mixer holds a depthwise ``nn.Conv1d``, 1-D ``A_log``, ``D`` and
  ``dt_bias``; Mamba1's ``A_log`` is 2-D), a MoE (an ``experts`` child), attention (a forward that
  takes ``position_embeddings`` or an ``attention_mask``), a dense MLP (linear maps only), a norm;
* the residual steps of a layer (which norm feeds which block, in which order) come from one full
  forward with every call recorded: a block's input must equal its norm applied to the running
  residual, and the layer's output the residual plus the block outputs;
* the per-layer kind order is the built model's; the config list that selects a kind is the one whose
  values map onto that order;
* each block kind is measured once: attention and MLPs by ``analyze``'s own probes, a Mamba2 mixer
  from its parameter shapes, its sizes' config fields confirmed by rebuilding the mixer with the
  field changed, and its output checked against the canonical ops (``_check_mamba2``).

A construct no template covers raises ``UnsupportedFeature`` naming the module path.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import re
from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2CLS

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.analyze_classic import projections
from onboardlm.onboard.analyze_kda import analyze_channel_delta
from onboardlm.onboard.analyze_mamba2_scales import (
    Mamba2Scales,
    input_scale,
    norm_switch,
    order_switch,
    segment_scales,
)
from onboardlm.onboard.analyze_mixers import (
    analyze_mixer,
    is_channel_decay_delta,
    is_gated_delta,
    is_short_conv,
)
from onboardlm.onboard.analyze_moe import analyze_mla, analyze_moe
from onboardlm.onboard.analyze_rg_lru import analyze_rg_lru
from onboardlm.onboard.spec import ArchitectureSpec, DecoderLayerSpec, NormSpec, RopeSpec
from onboardlm.onboard.spec_hybrid import (
    TOKEN_MIXERS,
    BranchSpec,
    HybridSpec,
    LayerKindSpec,
    Mamba1MixerSpec,
    Mamba2MixerSpec,
    MixerKind,
    StepSpec,
)
from onboardlm.testing.capture import record_calls

if TYPE_CHECKING:
    from onboardlm.onboard.analyze import _Analyzer

_TOL = 1e-5
_HINT = "add a template for it in onboardlm/onboard/templates and teach analyze_hybrid.py to recognise it"


# --------------------------------------------------------------------------------------------------
# What a module is
# --------------------------------------------------------------------------------------------------


def _own(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _convs(module: nn.Module) -> list[tuple[str, nn.Conv1d]]:
    return [(n, c) for n, c in module.named_children() if isinstance(c, nn.Conv1d)]


def _is_mamba2(module: nn.Module) -> bool:
    """A depthwise causal conv, per-head ``A_log`` / ``D`` / ``dt_bias`` vectors: a Mamba2 (SSD) mixer."""
    a_log = _own(module, "A_log")
    return (
        a_log is not None
        and a_log.dim() == 1
        and _own(module, "D") is not None
        and _own(module, "dt_bias") is not None
        and len(_convs(module)) == 1
    )


def _is_mamba1(module: nn.Module) -> bool:
    """Per-channel ``A_log [d_inner, d_state]`` beside a conv: Mamba1's selective scan."""
    a_log = _own(module, "A_log")
    return a_log is not None and a_log.dim() == 2 and len(_convs(module)) == 1


def _is_lightning(module: nn.Module) -> bool:
    """Fixed decay buffers instead of key/value projections of their own: a per-head slope
    ``[H, 1, 1]`` and a square block decay matrix ``[H, n, n]`` beside linear projections and no
    conv (MiniMax's lightning attention, a linear attention with constant exponential decay)."""
    buffers = [b for b in module.buffers(recurse=False) if b.is_floating_point()]
    slope = any(b.dim() == 3 and b.shape[1:] == (1, 1) for b in buffers)
    block = any(b.dim() >= 3 and b.shape[-1] == b.shape[-2] > 1 for b in buffers)
    has_linear = any(isinstance(c, nn.Linear) for c in module.children())
    return slope and block and has_linear and not _convs(module)


def _is_rg_lru(module: nn.Module) -> bool:
    """A depthwise conv beside a child holding block-diagonal gate weights ``[H, w, w]`` (two or more)
    and a per-channel recurrence parameter: Griffin's RG-LRU recurrent block (RecurrentGemma)."""
    convs = _convs(module)
    if len(convs) != 1 or convs[0][1].groups != convs[0][1].in_channels:
        return False
    for child in module.children():
        own = list(child.parameters(recurse=False))
        blocks = [p for p in own if p.dim() == 3 and p.shape[-1] == p.shape[-2]]
        if len(blocks) >= 2 and any(p.dim() == 1 for p in own):
            return True
    return False


#: Token mixers other than attention, by what their modules hold; checked in order. Another helper
#: adds its kinds here (gated delta rule, short convolution) with a spec class and an emitter.
MIXER_RECOGNISERS: list[tuple[MixerKind, Callable[[nn.Module], bool]]] = [
    ("mamba2", _is_mamba2),
    ("mamba1", _is_mamba1),
    ("gated_delta", is_gated_delta),  # analyze_mixers: Qwen3-Next / Qwen3.5 / OLMo Hybrid linear attention
    ("short_conv", is_short_conv),  # analyze_mixers: LFM2's gated short convolution
    ("kda", is_channel_decay_delta),  # analyze_kda: Kimi Delta Attention (a decay per key channel)
    ("lightning", _is_lightning),  # recognised to be refused (MIXER_NAMES)
    ("rg_lru", _is_rg_lru),  # analyze_rg_lru: Griffin's recurrent block (RecurrentGemma)
]

#: Block kinds measured by their own analyzer module: (analyzer, path, layer index, module) -> spec.
MIXER_ANALYZERS: dict[MixerKind, Callable[[_Analyzer, str, int, nn.Module], Any]] = {
    "gated_delta": lambda an, path, index, module: analyze_mixer(an.tiny, module, path, index),
    "short_conv": lambda an, path, index, module: analyze_mixer(an.tiny, module, path, index),
    "kda": lambda an, path, index, module: analyze_channel_delta(an.tiny, module, path, index),
    "rg_lru": lambda an, path, index, module: analyze_rg_lru(an.tiny, module, path, index),
}

#: What a recognised mixer kind is, for refusals of kinds that have no template yet.
MIXER_NAMES = {
    "mamba2": "Mamba2 SSD mixer",
    "mamba1": "Mamba1 selective scan (per-channel A [d_inner, d_state], dt projection)",
    "kda": "gated delta rule with a per-channel decay (Kimi Delta Attention)",
    "lightning": "lightning attention (linear attention with fixed per-head decay slopes, computed in blocks);"
    " no canonical op covers it yet",
    "rg_lru": "RG-LRU recurrent block (Griffin's real-gated linear recurrence with block-diagonal input and"
    " recurrence gates)",
}


def _takes(module: nn.Module, parameter: str) -> bool:
    try:
        return parameter in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def block_kind(module: nn.Module) -> MixerKind | None:
    """The kind of a decoder-layer child, or None for a norm or anything without weights of its own."""
    for kind, recognise in MIXER_RECOGNISERS:
        if recognise(module):
            return kind
    if any(name == "experts" for name, _ in module.named_children()):
        return "moe"
    if not any(True for _ in module.parameters()):
        return None
    if projections(module) and (_takes(module, "position_embeddings") or _takes(module, "attention_mask")):
        return "attention"
    if projections(module):
        return "mlp"
    return None


def needs_hybrid(layers: nn.ModuleList) -> bool:
    """Layers of different classes, or a layer holding a token mixer other than attention."""
    if len({type(layer) for layer in layers}) > 1:
        return True
    return any(
        block_kind(child) in TOKEN_MIXERS - {"attention"} for layer in layers for child in layer.children()
    )


# --------------------------------------------------------------------------------------------------
# Layer kinds and their order
# --------------------------------------------------------------------------------------------------


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=_TOL, atol=_TOL)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _layer_steps(
    layers_path: str,
    layers: nn.ModuleList,
    model: nn.Module,
    scales: list[tuple[str, float]] | None = None,
) -> list[tuple[StepSpec, ...]]:
    """Residual steps of each layer, measured from one recorded forward of the whole model.
    ``scales``: (config expression, value) of the multipliers a general step may hold."""
    paths = []
    for index, layer in enumerate(layers):
        paths.append(f"{layers_path}.{index}")
        paths += [f"{layers_path}.{index}.{name}" for name, _ in layer.named_children()]
    model = copy.deepcopy(model)  # norm weights made telling: each norm's output differs from the others'
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.get_submodule(layers_path):
            for child in layer.children():
                if block_kind(child) is None:
                    for param in child.parameters():
                        param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    layers = model.get_submodule(layers_path)
    input_ids = torch.arange(1, 8)[None]
    calls = record_calls(model, paths, input_ids=input_ids, position_ids=torch.arange(7)[None])
    found = []
    for index, layer in enumerate(layers):
        path = f"{layers_path}.{index}"
        children = dict(layer.named_children())
        kinds = {name: block_kind(child) for name, child in children.items()}
        blocks = [n for n, k in kinds.items() if k is not None]
        norms = [n for n, k in kinds.items() if k is None and any(True for _ in children[n].parameters())]
        unknown = [n for n in blocks if not calls[f"{path}.{n}"]]
        if unknown:
            raise UnsupportedFeature(f"{path}.{unknown[0]}", "a block the layer's forward never calls", _HINT)
        (layer_call,) = calls[path]
        residual = layer_call.hidden_states
        steps = []
        # blocks in the order the forward calls them: the record keeps per-path order only, so order
        # by the residual each block's norm input matches
        pending = list(blocks)
        while pending:
            match = None
            for name in pending:
                (call,) = calls[f"{path}.{name}"]
                # norms no earlier step used first: identical norms at init ((1 + 0) * x) all match
                for norm in sorted(norms, key=lambda n: any(step.norm == n for step in steps)):
                    with torch.no_grad():
                        normed = children[norm](residual)
                    if _close(normed, call.hidden_states):
                        match = (name, norm, call)
                        break
                if match:
                    break
            if match is not None and not _continues(
                residual + _first(match[2].output),
                [n for n in pending if n != match[0]],
                calls,
                path,
                children,
                norms,
            ):
                match = None  # the plain step does not lead on: a general step (parallel, sandwich, scaled)
            general = match is None and _general_step(
                calls, path, pending, residual, children, norms, steps, kinds, scales or []
            )
            if general:
                step, residual = general
                steps.append(step)
                for branch in step.branches:
                    pending.remove(branch.attr)
                continue
            post = match is None and _post_norm_step(calls, path, pending, residual, children, norms, steps)
            if post:
                name, norm, call = post
                residual = residual + children[norm](_first(call.output)).detach()
                steps.append(StepSpec(name, kinds[name], norm, post=True))  # type: ignore[arg-type]
                pending.remove(name)
                continue
            if match is None:
                raise UnsupportedFeature(
                    path,
                    f"residual layout of blocks {pending} with norms {norms} matches no template"
                    f" (expected h = h + block(norm(h)) per block)"
                    f"{_post_norm_hint(calls, path, pending, residual, children, norms) or _layout_hint(calls, path, pending)}",
                    _HINT,
                )
            name, norm, call = match
            residual = residual + _first(call.output)
            steps.append(StepSpec(name, kinds[name], norm))  # type: ignore[arg-type]
            pending.remove(name)
        if not _close(residual, _first(layer_call.output)):
            raise UnsupportedFeature(
                path, "the layer's output is not its input plus its blocks' outputs", _HINT
            )
        found.append(tuple(steps))
    return found


def _proportion(x: torch.Tensor, reference: torch.Tensor) -> float | None:
    """``s`` with ``x == s * reference`` (within the tolerance), else None."""
    if x.shape != reference.shape:
        return None
    x, reference = x.double(), reference.double()
    scale = float((x * reference).sum() / (reference * reference).sum().clamp_min(1e-30))
    return scale if _close(x, scale * reference) else None


def _continues(
    after: torch.Tensor,
    rest: list[str],
    calls: dict[str, list[Any]],
    path: str,
    children: dict[str, nn.Module],
    norms: list[str],
) -> bool:
    """The residual ``after`` a step leads on: the layer's output when no block is left, else some
    block left reads a norm of it (times a constant)."""
    if not rest:
        return _close(after, _first(calls[path][0].output))
    with torch.no_grad():
        normed = [after] + [children[n](after) for n in norms]  # a post-norm block reads ``after``
    return any(
        _proportion(calls[f"{path}.{name}"][0].hidden_states, candidate) is not None
        for name in rest
        for candidate in normed
    )


def _scale_expression(value: float, scales: list[tuple[str, float]]) -> str | None | bool:
    """The config expression of a measured multiplier: None for 1, False for no known one."""
    if abs(value - 1.0) < 1e-5:
        return None
    for expression, candidate in scales:
        if abs(value - candidate) < 1e-5 * max(1.0, abs(candidate)):
            return expression
    return False


def _general_step(
    calls: dict[str, list[Any]],
    path: str,
    pending: list[str],
    residual: torch.Tensor,
    children: dict[str, nn.Module],
    norms: list[str],
    steps: list[StepSpec],
    kinds: dict[str, Any],
    scales: list[tuple[str, float]],
) -> tuple[StepSpec, torch.Tensor] | None:
    """The general pre-norm step ``h = h + post(sum_b block_b(norm(h) * in_b) * out_b) * scale``:
    the pending blocks reading one norm of the residual (each times a measured constant, matched to a
    config value) run in parallel; their output multipliers, an unused norm after them (sandwich) and
    the residual multiplier are the candidates (config values) with which the new residual leads on
    (``_continues``). Fewest multipliers first."""
    used = {s.norm for s in steps} | {s.post_norm for s in steps if s.post_norm}
    inputs = {name: calls[f"{path}.{name}"][0].hidden_states for name in pending}
    outputs = {name: _first(calls[f"{path}.{name}"][0].output).detach() for name in pending}
    values = [(None, 1.0)] + [(e, v) for e, v in scales if abs(v - 1.0) > 1e-5]
    for norm in sorted(norms, key=lambda n: n in used):
        with torch.no_grad():
            normed = children[norm](residual)
        group: dict[str, str | None] = {}
        for name in pending:
            scale = _proportion(inputs[name], normed)
            if scale is None:
                continue
            expression = _scale_expression(scale, scales)
            if expression is False:
                continue
            group[name] = expression  # type: ignore[assignment]
        if not group:
            continue
        names = list(group)
        rest = [n for n in pending if n not in group]
        posts = [None] + [n for n in norms if n not in used and n != norm]
        # a single block: its output multiplier is the residual one (or vanishes in a post norm)
        out_choices = [[(None, 1.0)]] if len(names) == 1 else [values] * len(names)
        for post in posts:
            for outs in itertools.product(*out_choices):
                total = sum(outputs[n] * v for n, (_, v) in zip(names, outs, strict=True))
                with torch.no_grad():
                    mixed = children[post](total) if post else total
                for scale_expr, scale in values:
                    after = residual + mixed * scale
                    if not _continues(after, rest, calls, path, children, norms):
                        continue
                    branches = [
                        BranchSpec(n, kinds[n], group[n], o) for n, (o, _) in zip(names, outs, strict=True)
                    ]
                    first = branches[0]
                    step = StepSpec(
                        first.attr,
                        first.kind,
                        norm,
                        post_norm=post,
                        scale=scale_expr,
                        in_scale=first.in_scale,
                        out_scale=first.out_scale,
                        parallel=tuple(branches[1:]),
                    )
                    return step, after.detach()
    return None


def _post_norm_step(
    calls: dict[str, list[Any]],
    path: str,
    pending: list[str],
    residual: torch.Tensor,
    children: dict[str, nn.Module],
    norms: list[str],
    steps: list[StepSpec],
) -> tuple[str, str, Any] | None:
    """A post-norm step ``h = h + norm(block(h))``: a pending block that reads the residual itself,
    and the one unused norm whose output on the block's, added to the residual, is what comes next
    (another pending block's input, that input's pre-norm, or the layer's output)."""
    layer_output = _first(calls[path][0].output)
    used = {step.norm for step in steps}
    for name in pending:
        (call,) = calls[f"{path}.{name}"]
        if not _close(residual, call.hidden_states):
            continue
        others = [calls[f"{path}.{other}"][0].hidden_states for other in pending if other != name]
        for norm in (n for n in norms if n not in used):
            with torch.no_grad():
                after = residual + children[norm](_first(call.output))
                nexts = [after] + [children[n](after) for n in norms if n not in used and n != norm]
            if any(_close(candidate, target) for candidate in nexts for target in others) or (
                not others and _close(after, layer_output)
            ):
                return name, norm, call
    return None


def _post_norm_hint(
    calls: dict[str, list[Any]],
    path: str,
    pending: list[str],
    residual: torch.Tensor,
    children: dict[str, nn.Module],
    norms: list[str],
) -> str:
    """The post-norm layout (OLMo 2: ``h = h + norm(block(h))``) when the recorded calls show it: a
    pending block reads the residual itself and one of the norms applied to its output, added to the
    residual, gives the next block's input or the layer's output."""
    for name in pending:
        (call,) = calls[f"{path}.{name}"]
        if not _close(residual, call.hidden_states):
            continue
        targets = [calls[f"{path}.{other}"][0].hidden_states for other in pending if other != name]
        targets.append(_first(calls[path][0].output))
        for norm in norms:
            with torch.no_grad():
                after = residual + children[norm](_first(call.output))
            if any(_close(after, target) for target in targets):
                return f": post-norm, {name} reads the residual and {norm} normalises its output (h = h + norm(block(h)))"
    return ""


def _layout_hint(calls: dict[str, list[Any]], path: str, pending: list[str]) -> str:
    """What the recorded inputs show instead: blocks fed the same tensor (parallel blocks), or a
    block input that is another's scaled (a multiplier on the way in)."""
    inputs = {name: calls[f"{path}.{name}"][0].hidden_states for name in pending}
    names = list(inputs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if _close(inputs[a], inputs[b]):
                return f": {a} and {b} read the same input (parallel blocks)"
    return ""


def _scale_candidates(an: _Analyzer) -> list[tuple[str, float]]:
    """(config expression, value) of the float config fields a residual step may be scaled by:
    multipliers first (Granite's ``residual_multiplier``, Falcon-H1's ``attention_in_multiplier``)."""
    floats = {
        name: value
        for name, value in an.fields.items()
        if isinstance(value, float)
        and value not in (0.0, 1.0)
        and not any(part in name for part in ("eps", "dropout", "range", "theta", "coef"))
    }
    ordered = sorted(floats, key=lambda name: ("multiplier" not in name, "residual" not in name, name))
    return [(f"config.{name}", floats[name]) for name in ordered]


def _kind_name(steps: tuple[StepSpec, ...]) -> str:
    return "+".join(step.kind for step in steps)


def _selector(an: _Analyzer, names: list[str], path: str) -> tuple[str | None, dict[str, tuple[Any, ...]]]:
    """The config list choosing each layer's kind: values of one list map onto the measured kinds."""
    config = an.tiny
    if len(set(names)) == 1:  # one kind: a per-layer kind list of one value is checked by the file
        stored = config.to_dict()  # a derived property (Bamba's) is not one the test config can set
        for field in ("layer_types", "layers_block_type"):
            value = stored.get(field)
            if isinstance(value, (list, tuple)) and len(value) == len(names) and len(set(value)) == 1:
                return f"config.{field}", {names[0]: (value[0],)}
        return None, {names[0]: ()}
    candidates = ["layer_types", "layers_block_type"] + sorted(
        n for n in dir(config) if not n.startswith("_") and n not in ("layer_types", "layers_block_type")
    )
    for field in candidates:
        try:
            value = getattr(config, field)
        except Exception:  # noqa: BLE001 - a property that cannot be computed tells nothing
            continue
        if not isinstance(value, (list, tuple)) or len(value) != len(names):
            continue
        if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
            continue
        mapping: dict[Any, str] = {}
        if all(mapping.setdefault(v, name) == name for v, name in zip(value, names, strict=True)):
            selectors: dict[str, tuple[Any, ...]] = {}
            for v, name in mapping.items():
                selectors[name] = (*selectors.get(name, ()), v)
            return f"config.{field}", selectors
    raise UnsupportedFeature(
        path,
        f"layers of kinds {list(dict.fromkeys(names))} in an order no config list gives",
        _HINT,
    )


# --------------------------------------------------------------------------------------------------
# Config expressions confirmed by rebuilding
# --------------------------------------------------------------------------------------------------


def _rebuild(module: nn.Module, config: Any, index: int) -> nn.Module:
    try:
        return type(module)(config, layer_idx=index)
    except TypeError:
        return type(module)(config, index)


def _field(
    an: _Analyzer,
    module: nn.Module,
    index: int,
    value: Any,
    measure: Callable[[nn.Module], Any],
    changed: Callable[[Any], Any],
    what: str,
    path: str,
) -> str:
    """``config.<field>`` whose value is ``value`` and which, changed, changes ``measure`` of the rebuilt
    module accordingly (``changed`` gives the new value to set)."""
    for name, current in an.fields.items():
        if type(current) is not type(value) or current != value:
            continue
        new = changed(value)
        config = copy.deepcopy(an.tiny)
        try:
            setattr(config, name, new)
            with torch.device("meta"):
                rebuilt = _rebuild(module, config, index)
        except Exception:  # noqa: BLE001 - a change the config or the module refuses tells nothing
            continue
        try:
            if measure(rebuilt) == (list(new) if isinstance(new, tuple) else new):
                return f"config.{name}"
        except Exception:  # noqa: BLE001
            continue
    raise UnsupportedFeature(path, f"{what} ({value!r}) from no config field", _HINT)


def _bias(an: _Analyzer, module: nn.Module, index: int, child: str) -> str:
    """Config expression of ``child``'s bias: the bool field whose flip adds or drops it, else a literal."""
    present = _own(getattr(module, child), "bias") is not None
    for name, value in an.fields.items():
        if not isinstance(value, bool):
            continue
        config = copy.deepcopy(an.tiny)
        try:
            setattr(config, name, not value)
            with torch.device("meta"):
                rebuilt = _rebuild(module, config, index)
        except Exception:  # noqa: BLE001
            continue
        if (_own(getattr(rebuilt, child), "bias") is not None) != present:
            return f"config.{name}" if present == value else f"not config.{name}"
    return str(present)


def _activation(an: _Analyzer, module: nn.Module, index: int, act: nn.Module, attr: str, path: str) -> str:
    """The config field naming the activation module ``attr`` (confirmed by rebuilding with another)."""
    for name, value in an.fields.items():
        if not isinstance(value, str) or value not in ACT2CLS:
            continue
        cls = ACT2CLS[value]
        cls = cls[0] if isinstance(cls, tuple) else cls
        if type(act) is not cls:
            continue
        other = "gelu" if value != "gelu" else "relu"
        config = copy.deepcopy(an.tiny)
        try:
            setattr(config, name, other)
            with torch.device("meta"):
                rebuilt = _rebuild(module, config, index)
        except Exception:  # noqa: BLE001
            continue
        if type(getattr(rebuilt, attr)) is not type(act):
            return f"config.{name}"
    raise UnsupportedFeature(f"{path}.{attr}", f"activation {type(act).__name__} from no config field", _HINT)


# --------------------------------------------------------------------------------------------------
# Mamba2
# --------------------------------------------------------------------------------------------------


def _gated_norm(module: nn.Module, width: int) -> tuple[str, nn.Module]:
    found = [
        (n, c)
        for n, c in module.named_children()
        if not projections(c)
        and not isinstance(c, nn.Conv1d)
        and isinstance(_own(c, "weight"), torch.Tensor)
        and c.weight.shape == (width,)
        and _takes(c, "gate")
    ]
    if len(found) != 1:
        raise UnsupportedFeature(
            type(module).__name__, "no gated RMSNorm (a norm over the inner width taking a gate)", _HINT
        )
    return found[0]


def _gated_norm_or_none(module: nn.Module, width: int) -> tuple[str, nn.Module] | None:
    try:
        return _gated_norm(module, width)
    except UnsupportedFeature:
        return None


def _group_size(norm: nn.Module, width: int) -> int:
    """The gated norm's group width, measured: the largest divisor of ``width`` it normalises over."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, width, generator=generator) * 1.5 + 0.2
    with torch.no_grad():
        probe = copy.deepcopy(norm).float()
        probe.weight.fill_(1.0)
        expected = probe(x, None)
    for size in sorted((d for d in range(1, width + 1) if width % d == 0), reverse=True):
        g = x.unflatten(-1, (-1, size))
        for eps in (1e-5, 1e-6, getattr(norm, "variance_epsilon", 1e-5), getattr(norm, "eps", 1e-5)):
            out = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
            if _close(out, expected):
                return size
    raise UnsupportedFeature(type(norm).__name__, "gated norm is not a grouped RMSNorm", _HINT)


def _norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        if isinstance(getattr(norm, name, None), float):
            return getattr(norm, name)
    raise UnsupportedFeature(type(norm).__name__, "gated norm without an epsilon attribute", _HINT)


def mamba2_spec(an: _Analyzer, path: str, index: int, mixer: nn.Module) -> Mamba2MixerSpec:
    hidden = an.hidden
    linears = projections(mixer)
    ins = [n for n, p in linears.items() if p.in_features == hidden and not p.transposed]
    outs = [n for n, p in linears.items() if p.out_features == hidden and not p.transposed and n not in ins]
    if len(ins) != 1 or len(outs) != 1 or len(linears) != 2:
        raise UnsupportedFeature(
            path, f"Mamba2 mixer projections {sorted(linears)} (expected in and out)", _HINT
        )
    in_name, out_name = ins[0], outs[0]
    conv_name, conv = _convs(mixer)[0]
    heads = mixer.A_log.numel()
    inner = linears[out_name].in_features
    conv_dim = conv.out_channels
    has_norm = lambda m: _gated_norm_or_none(m, inner) is not None  # noqa: E731
    switched = norm_switch(an, mixer, index, has_norm)
    if switched is None:
        raise UnsupportedFeature(path, "no gated RMSNorm (a norm over the inner width taking a gate)", _HINT)
    norm_mixer, norm_flag = switched
    norm_name, norm = _gated_norm_or_none(norm_mixer, inner)  # type: ignore[misc]
    group = _group_size(norm, inner)
    groups = inner // group
    state = (conv_dim - inner) // (2 * groups)
    if (
        conv.groups != conv_dim
        or conv.in_channels != conv_dim
        or conv.padding[0] != conv.kernel_size[0] - 1
        or conv.stride[0] != 1
        or conv.dilation[0] != 1
        or inner % heads
        or heads % groups
        or 2 * groups * state + inner != conv_dim
    ):
        raise UnsupportedFeature(
            f"{path}.{conv_name}", "convolution is not a causal depthwise conv over x|B|C", _HINT
        )
    if linears[in_name].out_features != inner + conv_dim + heads:
        raise UnsupportedFeature(
            f"{path}.{in_name}",
            f"in_proj width {linears[in_name].out_features} is not gate + x|B|C + dt ({inner} + {conv_dim} + {heads})",
            _HINT,
        )
    in_value, in_expr = input_scale(an, mixer, index, in_name, path)
    sizes = [inner, inner, groups * state, groups * state, heads]
    segments, segment_exprs = segment_scales(an, mixer, path, linears[in_name].out_features, sizes)
    scales = Mamba2Scales(in_value, segments)
    acts = [
        n
        for n, c in mixer.named_children()
        if type(c).__name__ in {getattr(v, "__name__", "") for v in _act_classes()}
    ]
    if len(acts) != 1:
        raise UnsupportedFeature(path, f"Mamba2 mixer activations {acts} (expected one)", _HINT)
    act_attr = acts[0]

    def field(
        value: Any, measure: Callable[[nn.Module], Any], what: str, change: Callable[[Any], Any]
    ) -> str:
        return _field(an, mixer, index, value, measure, change, what, path)

    double = lambda v: 2 * v  # noqa: E731
    heads_expr = field(heads, lambda m: m.A_log.numel(), "SSM heads", double)
    conv_of = lambda m: getattr(m, conv_name)  # noqa: E731
    out_of = lambda m: getattr(m, out_name)  # noqa: E731
    groups_expr = field(
        groups,
        lambda m: (conv_of(m).out_channels - out_of(m).in_features) // (2 * state),
        "SSM groups",
        double,
    )
    state_expr = field(
        state,
        lambda m: (conv_of(m).out_channels - out_of(m).in_features) // (2 * groups),
        "SSM state size",
        double,
    )
    kernel_expr = field(
        conv.kernel_size[0], lambda m: conv_of(m).kernel_size[0], "conv kernel", lambda v: v + 1
    )
    inner_expr = _inner_expression(an, mixer, index, inner, heads_expr, out_name, path)
    chunk = getattr(mixer, "chunk_size", None)
    chunk_expr = (
        field(chunk, lambda m: m.chunk_size, "SSD chunk size", double) if isinstance(chunk, int) else "256"
    )
    ignored = ignored_time_step_limit(mixer, an.fields.get("time_step_limit"))
    if ignored is not None:
        raise UnsupportedFeature(
            path,
            f"{ignored}; the Mamba2 template follows config.time_step_limit",
            "onboard with a transformers release whose mixer reads config.time_step_limit",
        )
    limit = getattr(mixer, "time_step_limit", None)
    if limit is None:
        limit_expr = '[0.0, float("inf")]'
    else:
        raw = field(
            limit if not isinstance(limit, tuple) else an.fields.get("time_step_limit", limit),
            lambda m: list(m.time_step_limit),
            "time step limit",
            lambda _v: [0.01, 5.0],
        )
        limit_expr = f"[float(value) for value in {raw}]"
    eps = _norm_eps(norm)
    eps_expr = _field(
        _keeping_norm(an, norm_flag),
        norm_mixer,
        index,
        eps,
        _norm_eps_of(norm_name),
        lambda v: v * 10,
        "gated norm epsilon",
        path,
    )
    spec = Mamba2MixerSpec(
        class_name=type(mixer).__name__,
        norm_class=type(norm).__name__,
        in_proj=in_name,
        out_proj=out_name,
        conv=conv_name,
        norm=norm_name,
        act_attr=act_attr,
        act=_activation(an, mixer, index, getattr(mixer, act_attr), act_attr, path),
        in_bias=_bias(an, mixer, index, in_name),
        out_bias=_bias(an, mixer, index, out_name),
        conv_bias=_bias(an, mixer, index, conv_name),
        num_heads=heads_expr,
        n_groups=groups_expr,
        state_size=state_expr,
        intermediate=inner_expr,
        conv_kernel=kernel_expr,
        chunk_size=chunk_expr,
        time_step_limit=limit_expr,
        eps=eps_expr,
        norm_flag=norm_flag,
        in_scale=in_expr,
        segment_scales=segment_exprs,
    )

    def order_of(module: nn.Module) -> bool | None:
        checks = (b for b in (False, True) if _check_mamba2(module, spec, groups, state, hidden, scales, b))
        return next(checks, None)

    before = order_of(norm_mixer)
    if before is not None and (
        norm_mixer is mixer or _check_mamba2(mixer, spec, groups, state, hidden, scales)
    ):
        order = order_switch(an, norm_mixer, index, norm_flag, before, order_of)
        return dataclasses.replace(spec, norm_before_gate=order or before)
    raise UnsupportedFeature(
        path,
        f"{type(mixer).__name__}'s output differs from the Mamba2 template (in_proj -> causal conv -> SSD"
        " scan -> gated RMSNorm -> out_proj): extra scaling or another wiring",
        _HINT,
    )


def ignored_time_step_limit(mixer: nn.Module, named: Any) -> str | None:
    """Why ``mixer`` clamps its time step to other bounds than ``named`` (the config's
    ``time_step_limit``), or None: transformers 5.17's Nemotron-H mixer clamps at
    ``(time_step_min, inf)`` and ignores the field, which later releases' mixers and the Mamba2
    template read."""
    limit = getattr(mixer, "time_step_limit", None)
    if not isinstance(limit, (tuple, list)) or not isinstance(named, (tuple, list)):
        return None
    if [float(v) for v in limit] == [float(v) for v in named]:
        return None
    return (
        f"transformers {transformers.__version__}'s {type(mixer).__name__} clamps the time step to"
        f" {tuple(limit)}, not to config.time_step_limit {tuple(named)}, which it ignores"
    )


def _keeping_norm(an: _Analyzer, norm_flag: str | None) -> Any:
    """``an``, or a view of it whose tiny config keeps the gated norm that ``norm_flag`` switches."""
    if norm_flag is None:
        return an
    config = copy.deepcopy(an.tiny)
    setattr(config, norm_flag.removeprefix("not ").removeprefix("config."), not norm_flag.startswith("not "))
    return SimpleNamespace(tiny=config, fields={**an.fields, **config.to_dict()}, hidden=an.hidden)


def _act_classes() -> list[type]:
    classes = []
    for value in ACT2CLS.values():
        classes.append(value[0] if isinstance(value, tuple) else value)
    return classes


def _norm_eps_of(norm_name: str) -> Callable[[nn.Module], float]:
    return lambda m: _norm_eps(getattr(m, norm_name))


def _inner_expression(
    an: _Analyzer, mixer: nn.Module, index: int, inner: int, heads_expr: str | None, out_name: str, path: str
) -> str:
    """The inner width: a field of its own (``heads_expr`` None: Mamba1), ``int(config.<expand> *
    config.hidden_size)`` or ``heads * config.<head_dim>``, confirmed on rebuilt mixers."""
    candidates = []
    for name, value in an.fields.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value * an.hidden == inner:
            candidates.append((f"int(config.{name} * config.hidden_size)", name))
        if heads_expr is None and _is_count(value) and value == inner:  # a field of its own
            candidates.insert(0, (f"config.{name}", name))
        elif heads_expr and _is_count(value) and value * int(eval(heads_expr, {"config": an.tiny})) == inner:  # noqa: S307
            candidates.append((f"{heads_expr} * config.{name}", name))
        elif heads_expr and _is_count(value) and value == inner:  # a field of its own (mamba_d_ssm)
            candidates.append((f"config.{name}", name))
    for expression, name in candidates:
        config = copy.deepcopy(an.tiny)
        try:
            setattr(config, name, 2 * getattr(config, name))
            with torch.device("meta"):
                rebuilt = _rebuild(mixer, config, index)
        except Exception:  # noqa: BLE001
            continue
        if getattr(rebuilt, out_name).in_features == eval(expression, {"config": config}):  # noqa: S307
            return _with_fallback(an, mixer, index, expression, name, candidates, out_name)
    raise UnsupportedFeature(f"{path}.{out_name}", f"inner width {inner} from no config expression", _HINT)


def _with_fallback(
    an: _Analyzer,
    mixer: nn.Module,
    index: int,
    expression: str,
    name: str,
    candidates: list[tuple[str, str]],
    out_name: str,
) -> str:
    """``expression`` for a field of its own that the module replaces by another candidate when the
    field is None (Falcon-H1: ``mamba_d_ssm`` or ``int(mamba_expand * hidden_size)``), else as is."""
    if expression != f"config.{name}":
        return expression
    config = copy.deepcopy(an.tiny)
    try:
        setattr(config, name, None)
        with torch.device("meta"):
            width = getattr(_rebuild(mixer, config, index), out_name).in_features
    except Exception:  # noqa: BLE001 - a field that cannot be None has no fallback
        return expression
    for other, other_name in candidates:
        if other_name == name or other == expression or eval(other, {"config": config}) != width:  # noqa: S307
            continue
        changed = copy.deepcopy(config)  # confirmed with the other candidate's field changed too
        try:
            setattr(changed, other_name, 2 * getattr(changed, other_name))
            with torch.device("meta"):
                width = getattr(_rebuild(mixer, changed, index), out_name).in_features
        except Exception:  # noqa: BLE001
            continue
        if eval(other, {"config": changed}) == width:  # noqa: S307
            return f"({other} if config.{name} is None else config.{name})"
    return expression


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def mamba2_reference(
    mixer: nn.Module,
    spec: Mamba2MixerSpec,
    groups: int,
    state: int,
    x: torch.Tensor,
    scales: Mamba2Scales | None = None,
    before: bool | None = None,
) -> torch.Tensor:
    """What the Mamba2 template computes, on the HF mixer's own weights (canonical ops), with the
    measured multipliers ``scales`` and the norm order ``before`` (the spec's where a bool)."""
    ops = torch.ops.auto_deploy
    scales = scales or Mamba2Scales()
    in_proj, out_proj = getattr(mixer, spec.in_proj), getattr(mixer, spec.out_proj)
    conv = getattr(mixer, spec.conv)
    norm = _gated_norm_or_none(mixer, out_proj.in_features)
    heads = mixer.A_log.numel()
    inner = out_proj.in_features
    batch, seq_len, _ = x.shape
    projected = F.linear(x * scales.in_scale, in_proj.weight, in_proj.bias)
    if scales.segments:
        sizes = [inner, inner, groups * state, groups * state, heads]
        vector = torch.cat([torch.full((n,), v) for n, v in zip(sizes, scales.segments, strict=True)])
        projected = projected * vector
    gate, xbc, dt = projected.split([inner, inner + 2 * groups * state, heads], dim=-1)
    xbc = getattr(mixer, spec.act_attr)(
        ops.torch_causal_conv1d(
            xbc, conv.weight, conv.bias, padding=conv.kernel_size[0] - 1, groups=conv.groups
        )
    )
    h, b, c = xbc.split([inner, groups * state, groups * state], dim=-1)
    limit = [float(v) for v in getattr(mixer, "time_step_limit", (0.0, float("inf")))]
    y = ops.torch_ssm(
        h.reshape(batch, seq_len, heads, inner // heads),
        -torch.exp(mixer.A_log.float()),
        b.reshape(batch, seq_len, groups, state),
        c.reshape(batch, seq_len, groups, state),
        mixer.D,
        dt,
        mixer.dt_bias,
        limit,
        int(getattr(mixer, "chunk_size", 256)),
    )
    y = y.reshape(batch, seq_len, inner)
    if norm is None:  # the config switch drops the norm: the gate alone
        y = y * F.silu(gate)
    else:
        y = ops.torch_rmsnorm_gated(
            y,
            norm[1].weight,
            gate,
            _norm_eps(norm[1]),
            inner // groups,
            spec.norm_before_gate if before is None else before,
        )
    return F.linear(y.to(x.dtype), out_proj.weight, out_proj.bias)


def _check_mamba2(
    mixer: nn.Module,
    spec: Mamba2MixerSpec,
    groups: int,
    state: int,
    hidden: int,
    scales: Mamba2Scales | None = None,
    before: bool | None = None,
) -> bool:
    generator = torch.Generator().manual_seed(4)
    probe = copy.deepcopy(mixer).float().eval()
    with torch.no_grad():
        for name, param in probe.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.rand(param.shape, generator=generator) * 1.5 - 0.5)
            elif name.endswith("dt_bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5 - 1.0)
            else:
                param.copy_(
                    torch.randn(param.shape, generator=generator) * 0.3 + (0.5 if param.dim() == 1 else 0)
                )
        x = torch.randn(2, 13, hidden, generator=generator)
        expected = _first(probe(x))
        actual = mamba2_reference(probe, spec, groups, state, x, scales, before)
    return _close(actual, expected)


# --------------------------------------------------------------------------------------------------
# Mamba1
# --------------------------------------------------------------------------------------------------


def mamba1_spec(an: _Analyzer, path: str, index: int, mixer: nn.Module) -> Mamba1MixerSpec:
    hidden = an.hidden
    linears = projections(mixer)
    inner, state = mixer.A_log.shape
    ins = [n for n, p in linears.items() if p.in_features == hidden and p.out_features == 2 * inner]
    outs = [n for n, p in linears.items() if p.out_features == hidden and p.in_features == inner]
    xs = [
        n
        for n, p in linears.items()
        if p.in_features == inner and p.out_features > 2 * state and n not in outs
    ]
    dts = [n for n, p in linears.items() if p.out_features == inner and n not in ins]
    if len(linears) != 4 or not (len(ins) == len(outs) == len(xs) == len(dts) == 1):
        raise UnsupportedFeature(
            path, f"Mamba1 mixer projections {sorted(linears)} (expected in, x, dt and out)", _HINT
        )
    in_name, out_name, x_name, dt_name = ins[0], outs[0], xs[0], dts[0]
    rank = linears[x_name].out_features - 2 * state
    if linears[dt_name].in_features != rank or linears[x_name].has_bias or not linears[dt_name].has_bias:
        raise UnsupportedFeature(
            f"{path}.{dt_name}", "dt projection is not rank -> channels with a bias", _HINT
        )
    conv_name, conv = _convs(mixer)[0]
    if (
        conv.groups != inner
        or conv.in_channels != inner
        or conv.out_channels != inner
        or conv.padding[0] != conv.kernel_size[0] - 1
        or conv.stride[0] != 1
        or conv.dilation[0] != 1
    ):
        raise UnsupportedFeature(
            f"{path}.{conv_name}", "convolution is not a causal depthwise conv over x", _HINT
        )
    classes = {getattr(c, "__name__", "") for c in _act_classes()}
    acts = [n for n, c in mixer.named_children() if type(c).__name__ in classes]
    if len(acts) != 1:
        raise UnsupportedFeature(path, f"Mamba1 mixer activations {acts} (expected one)", _HINT)
    others = [
        (n, c)
        for n, c in mixer.named_children()
        if n not in linears and n != conv_name and n != acts[0] and not isinstance(c, nn.Dropout)
    ]
    norms: tuple[tuple[str, Any], ...] = ()
    if others:  # norms of dt, B and C (Jamba, Falcon-Mamba), in the order x_proj splits them
        names = [n for n, _ in others]
        if len(others) != 3:
            raise UnsupportedFeature(f"{path}.{names[0]}", f"Mamba1 mixer submodules {names}", _HINT)
        measured = []
        for (name, child), width in zip(others, (rank, state, state), strict=True):
            norm = an._norm_of_width(f"{path}.{name}", child, width)
            if not isinstance(getattr(child, "weight", None), nn.Parameter):  # a unit buffer, no weight
                norm = dataclasses.replace(norm, weight=False)
            measured.append((name, norm))
        norms = tuple(measured)

    def field(
        value: Any, measure: Callable[[nn.Module], Any], what: str, change: Callable[[Any], Any]
    ) -> str:
        return _field(an, mixer, index, value, measure, change, what, path)

    double = lambda v: 2 * v  # noqa: E731
    spec = Mamba1MixerSpec(
        class_name=type(mixer).__name__,
        in_proj=in_name,
        x_proj=x_name,
        dt_proj=dt_name,
        out_proj=out_name,
        conv=conv_name,
        act_attr=acts[0],
        act=_activation(an, mixer, index, getattr(mixer, acts[0]), acts[0], path),
        in_bias=_bias(an, mixer, index, in_name),
        out_bias=_bias(an, mixer, index, out_name),
        conv_bias=_bias(an, mixer, index, conv_name),
        intermediate=_inner_expression(an, mixer, index, inner, None, out_name, path),
        state_size=field(state, lambda m: m.A_log.shape[1], "SSM state size", double),
        rank=field(rank, lambda m: getattr(m, dt_name).in_features, "dt rank", double),
        conv_kernel=field(
            conv.kernel_size[0],
            lambda m: getattr(m, conv_name).kernel_size[0],
            "conv kernel",
            lambda v: v + 1,
        ),
        ssm_norms=norms,
    )
    if not _check_mamba1(mixer, spec, hidden):
        raise UnsupportedFeature(
            path,
            f"{type(mixer).__name__}'s output differs from the Mamba1 template (in_proj -> causal conv ->"
            " x_proj/dt_proj -> selective scan -> SiLU gate -> out_proj)",
            _HINT,
        )
    return spec


def mamba1_reference(mixer: nn.Module, spec: Mamba1MixerSpec, x: torch.Tensor) -> torch.Tensor:
    """What the Mamba1 template computes, on the HF mixer's own weights (torch_ssm over N*I heads)."""
    ops = torch.ops.auto_deploy
    get = lambda name: getattr(mixer, name)  # noqa: E731
    inner, state = mixer.A_log.shape
    conv = get(spec.conv)
    batch, seq_len, _ = x.shape
    hs, gate = F.linear(x, get(spec.in_proj).weight, get(spec.in_proj).bias).split([inner, inner], dim=-1)
    hs = get(spec.act_attr)(
        ops.torch_causal_conv1d(hs, conv.weight, conv.bias, padding=conv.kernel_size[0] - 1, groups=inner)
    )
    rank = get(spec.dt_proj).in_features
    dt, b, c = F.linear(hs, get(spec.x_proj).weight).split([rank, state, state], dim=-1)
    if spec.ssm_norms:
        dt, b, c = (get(name)(t) for (name, _), t in zip(spec.ssm_norms, (dt, b, c), strict=True))
    dt = F.linear(dt, get(spec.dt_proj).weight)
    heads = [batch, seq_len, state * inner]  # state entry major: head n * inner + c reads group n
    y = ops.torch_ssm(
        hs[:, :, None, :].expand(-1, -1, state, -1).reshape(*heads, 1),
        -torch.exp(mixer.A_log.float()).t().flatten(),
        b[..., None],
        c[..., None],
        F.pad(mixer.D[None, :], (0, 0, 0, state - 1)).flatten(),
        dt[:, :, None, :].expand(-1, -1, state, -1).reshape(heads),
        get(spec.dt_proj).bias[None, :].expand(state, -1).flatten(),
        [0.0, float("inf")],
        32,
    )
    y = y.reshape(batch, seq_len, state, inner).sum(2)
    y = y * F.silu(gate.float())
    return F.linear(y.to(x.dtype), get(spec.out_proj).weight, get(spec.out_proj).bias)


def _check_mamba1(mixer: nn.Module, spec: Mamba1MixerSpec, hidden: int) -> bool:
    generator = torch.Generator().manual_seed(6)
    probe = copy.deepcopy(mixer).float().eval()
    with torch.no_grad():
        for name, param in probe.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.rand(param.shape, generator=generator) * 1.5 - 0.5)
            elif param.dim() == 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + 0.5)
            else:  # unit-scale activations: the check is relative to the output's size
                param.copy_(torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5)
        x = torch.randn(2, 11, hidden, generator=generator)
        expected = _first(probe(x))
        actual = mamba1_reference(probe, spec, x)
    error = (actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()
    return actual.shape == expected.shape and bool(error < _TOL)


# --------------------------------------------------------------------------------------------------
# The whole stack
# --------------------------------------------------------------------------------------------------


def _model_chosen_nope(
    an: _Analyzer,
    layers_path: str,
    num_layers: int,
    attention: Any,
    rope: RopeSpec | None,
    attention_at: set[int] | None = None,
) -> Any:
    """The attention's RoPE flag where the model's forward hands some layers no RoPE tables
    (LaRA-mini's full-attention layers get ``position_embeddings=None``): measured from one recorded
    forward, the config list whose values pick those layers found as for per-layer NoPE."""
    if rope is None or getattr(attention, "rope_flag", None) is not None:
        return attention
    paths = [f"{layers_path}.{index}" for index in range(num_layers)]
    calls = record_calls(
        an.model, paths, input_ids=torch.arange(1, 8)[None], position_ids=torch.arange(7)[None]
    )
    uses = [calls[path][0].position_embeddings is not None for path in paths]
    # tables a layer without attention gets (or not) tell nothing
    care = [attention_at is None or index in attention_at for index in range(num_layers)]
    counted = [use for use, counts in zip(uses, care, strict=True) if counts]
    if all(counted) or not any(counted):  # every layer gets the tables (or none is passed by keyword)
        return attention
    return dataclasses.replace(attention, rope_flag=an._rope_flag(layers_path, uses, care))


def _hybrid_mla(an: _Analyzer, path: str, index: int, module: nn.Module, rope: RopeSpec | None) -> Any:
    """The multi-head latent attention of a hybrid stack, measured on its first layer ``index``; a
    model without a rotary embedding whose attention takes no RoPE tables leaves the rope channels
    unrotated (Kimi Linear's NoPE MLA)."""
    mla = analyze_mla(an.tiny, an.model, index)
    if mla is None:
        raise UnsupportedFeature(path, "a latent-KV attention the MLA analysis does not find", _HINT)
    if rope is not None:
        return mla
    if _takes(module, "position_embeddings"):
        raise UnsupportedFeature(
            path, "MLA that takes RoPE tables in a model without a rotary embedding", _HINT
        )
    return dataclasses.replace(mla, nope=True)


def _refuse_unbuilt_mixers(layers_path: str, layers: nn.ModuleList) -> None:
    """Refuse a recognised token mixer that has no spec or template yet before anything else about
    the layers (their residual layout, say): it is the feature a user has to wait for."""
    built = {"mamba2", "mamba1", *MIXER_ANALYZERS}
    for index, layer in enumerate(layers):
        for name, child in layer.named_children():
            kind = block_kind(child)
            if kind in MIXER_NAMES and kind not in built:
                raise UnsupportedFeature(
                    f"{layers_path}.{index}.{name}", f"{MIXER_NAMES[kind]}: no template yet", _HINT
                )


def _nested_blocks(module: nn.Module) -> list[tuple[str, str]]:
    """(name, kind) of the blocks a layer child holds when it is itself a layer (holds blocks of its
    own instead of being one): Zamba2's ``shared_transformer`` (attention + MLP) or ``mamba_decoder``."""
    if block_kind(module) is not None:
        return []
    return [
        (name, kind) for name, child in module.named_children() if (kind := block_kind(child)) is not None
    ]


def _refuse_nested_layers(layers_path: str, layers: nn.ModuleList, model: nn.Module) -> None:
    """Refuse a layer whose children are whole layers (blocks with their own norms and blocks), naming
    what one forward of the model measures about them: which block's weights are the very tensors of
    another layer's (a block shared across layers), and which block reads the token embeddings beside
    the hidden state (Zamba's shared transformer block, fed by the embeddings concatenated to the
    hidden state)."""
    nested = {
        index: {name: blocks for name, child in layer.named_children() if (blocks := _nested_blocks(child))}
        for index, layer in enumerate(layers)
    }
    index = next((i for i, children in nested.items() if children), None)
    if index is None:
        return
    path = f"{layers_path}.{index}"
    layer = layers[index]
    owners = {
        id(param): f"{layers_path}.{i}.{name}"
        for i, other in enumerate(layers)
        if i != index
        for name, child in other.named_children()
        for param in child.parameters()
    }
    input_ids = torch.arange(1, 8)[None]
    children = [f"{path}.{name}" for name in nested[index]]
    calls = record_calls(model, children, input_ids=input_ids, position_ids=torch.arange(7)[None])
    with torch.no_grad():
        embeddings = model.get_input_embeddings()(input_ids)
    parts = []
    for name, blocks in nested[index].items():
        what = f"{name} ({' + '.join(kind for _, kind in blocks)}"
        shared = sorted({owners[id(p)] for p in getattr(layer, name).parameters() if id(p) in owners})
        if shared:
            what += f", its weights the same tensors as {', '.join(shared)}'s"
        call = calls[f"{path}.{name}"]
        inputs = [*call[0].args[1:], *call[0].kwargs.values()] if call else []
        if any(
            isinstance(t, torch.Tensor) and t.shape == embeddings.shape and _close(t, embeddings)
            for t in inputs
        ):
            what += ", reading the token embeddings beside the hidden state"
        parts.append(what + ")")
    others = [name for name, child in layer.named_children() if name not in nested[index]]
    raise UnsupportedFeature(
        path,
        f"a layer of nested layers: {'; '.join(parts)}"
        f"{' with ' + ', '.join(others) if others else ''}; no hybrid template runs whole layers inside a"
        " layer (Zamba-style hybrid layers)",
        _HINT,
    )


def _reads_selector(rule: str, selector: str | None, tiny: Any) -> bool:
    """The MoE rule reads the kinds' selector list (itself or an alias with its values: NemotronH's
    ``layers_block_type`` behind ``layer_types``): the kinds already place the MoE."""
    if selector is None:
        return False
    try:
        values = eval(selector, {"__builtins__": {}}, {"config": tiny})  # noqa: S307 - a config expression
    except Exception:  # noqa: BLE001 - a selector this config cannot evaluate: compare by text
        return selector in rule
    return selector in rule or any(
        getattr(tiny, name, None) == values for name in re.findall(r"config\.(\w+)\[layer_idx\]", rule)
    )


def _check_shared_mlp_class(blocks: dict[str, Any], path: str) -> None:
    """A shared expert of the dense MLP's own class (NemotronH's ``NemotronHMLP``) is emitted once, by
    the MoE (with an ``intermediate_size`` argument): the dense MLP must be that class at its default
    width, bias and activation."""
    moe, mlp = blocks.get("moe"), blocks.get("mlp")
    shared = getattr(moe, "shared", None)
    if shared is None or mlp is None or mlp.class_name != shared.class_name:
        return
    plain = shared.plain_act is not None and mlp.kind == "plain" and mlp.act == shared.plain_act
    # moe_mlp.py.j2's gated class (Kimi Linear's KimiLinearMLP): gate_proj / up_proj / down_proj, act_fn
    gated = (
        shared.plain_act is None
        and moe.mlp_swiglu is None
        and mlp.kind == "gated"
        and mlp.act == "config.hidden_act"
        and mlp.act_attr == "act_fn"
        and (*(linear.name for linear in mlp.inputs), mlp.down.name) == ("gate_proj", "up_proj", "down_proj")
    )
    same = (
        (plain or gated)
        and mlp.intermediate == "config.intermediate_size"
        and all(linear.bias == moe.mlp_bias for linear in (*mlp.inputs, mlp.down))
    )
    if not same:
        raise UnsupportedFeature(
            f"{path}.{moe.attr}.{shared.attr}",
            f"shared expert and dense MLP of one class ({mlp.class_name}) built differently",
            _HINT,
        )


def _moe_placement(
    blocks: dict[str, Any],
    all_steps: list[tuple[StepSpec, ...]],
    path: str,
    selector: str | None,
    tiny: Any,
) -> Any:
    """The MoE spec as the hybrid layers build it. Where the MoE and the dense MLP share the layers'
    feed-forward attribute and the MoE layers follow a config rule of their own, not the layer kinds'
    selector (Jamba's ``expert_layer_period`` / ``_offset``, LFM2-MoE's ``num_dense_layers``, beside
    their attention / Mamba / conv kinds), every layer builds ``MoE if <rule> else MLP`` with the
    stack's own MLP block as the dense class. Else the kinds place the MoE."""
    moe = blocks["moe"]
    mlp = blocks.get("mlp")
    attrs = {step.attr for steps in all_steps for step in steps if step.kind in ("moe", "mlp")}
    rule = moe.layer_condition
    if any(len({b.kind for b in step.branches} & {"moe", "mlp"}) == 2 for s in all_steps for step in s):
        # the MoE beside a dense MLP of its own attribute in one step (GraniteMoeHybrid's shared_mlp):
        # the MLP is no alternative to the MoE; a config without experts (``rule`` false) is refused
        # by the file (``_moe_guard``)
        return dataclasses.replace(moe, dense_class=None, dense_width_expr=None)
    if mlp is None or rule == "True" or _reads_selector(rule, selector, tiny):
        return dataclasses.replace(moe, dense_class=None, dense_width_expr=None)
    if attrs != {moe.attr}:
        raise UnsupportedFeature(
            f"{path}.{moe.attr}", f"MoE placed by `{rule}` beside a dense MLP of another attribute", _HINT
        )
    return dataclasses.replace(moe, dense_class=mlp.class_name, dense_width_expr=None)


def analyze_hybrid(
    an: _Analyzer,
    *,
    path: str,
    parts: dict[str, tuple[str, Any]],
    rope: RopeSpec | None,
    head_attr: str,
    inner: nn.Module,
    prefix: str,
    stack_attr: str | None,
) -> ArchitectureSpec:
    """The ArchitectureSpec of a hybrid stack (``spec.hybrid`` set; attention/feed_forward: the one
    attention and dense feed-forward spec of the stack, or None)."""
    model = an.model
    model.config.use_cache = False  # a cache of SSM layers only has no attention mask to build
    layers_attr, layers = parts["layers"]
    layers_path = f"{path}.{layers_attr}"
    _refuse_unbuilt_mixers(layers_path, layers)
    _refuse_nested_layers(layers_path, layers, model)
    all_steps = _layer_steps(layers_path, layers, model, _scale_candidates(an))
    all_steps = [
        _with_post_norm_flags(an, layer, index, steps)
        for index, (layer, steps) in enumerate(zip(layers, all_steps, strict=True))
    ]
    names = [
        f"{type(layer).__name__}:{_kind_name(steps)}" for layer, steps in zip(layers, all_steps, strict=True)
    ]
    short = {name: name.split(":", 1)[1] or "identity" for name in names}
    if len(set(short.values())) < len(set(names)):  # one kind name in two classes: keep the class
        short = {name: name.replace(":", "_") for name in names}
    selector, selectors = _selector(an, [short[n] for n in names], layers_path)

    # one spec per block kind, measured on its first layer
    blocks: dict[str, Any] = {}
    attention = feed_forward = None
    norm_spec: NormSpec | None = None
    for index, (layer, steps) in enumerate(zip(layers, all_steps, strict=True)):
        layer_path = f"{layers_path}.{index}"
        for norm_attr in [s.norm for s in steps] + [s.post_norm for s in steps if s.post_norm]:
            norm = an._norm(f"{layer_path}.{norm_attr}", getattr(layer, norm_attr))
            if norm_spec is None:
                norm_spec = norm
            elif norm != norm_spec:
                raise UnsupportedFeature(f"{layer_path}.{norm_attr}", "layer norms of different kinds", _HINT)
        for step in (branch for s in steps for branch in s.branches):  # every block of the layer
            if step.kind in blocks:
                continue
            module = getattr(layer, step.attr)
            block_path = f"{layer_path}.{step.attr}"
            if step.kind == "mamba2":
                blocks["mamba2"] = mamba2_spec(an, block_path, index, module)
            elif step.kind in MIXER_ANALYZERS:
                blocks[step.kind] = MIXER_ANALYZERS[step.kind](an, block_path, index, module)
            elif step.kind == "mamba1":
                blocks["mamba1"] = mamba1_spec(an, block_path, index, module)
            elif step.kind == "attention" and hasattr(module, "kv_a_proj_with_mqa"):
                attention = blocks["attention"] = _hybrid_mla(an, block_path, index, module, rope)
            elif step.kind == "attention":
                attention_layers = nn.ModuleList(
                    [
                        other
                        for other, s in zip(layers, all_steps, strict=True)
                        if any(b.kind == "attention" for t in s for b in t.branches)
                    ]
                )
                attention, rope = _attention_of_subset(an, layer_path, attention_layers, all_steps, rope)
                at = {
                    i
                    for i, s in enumerate(all_steps)
                    if any(b.kind == "attention" for t in s for b in t.branches)
                }
                attention = _model_chosen_nope(an, layers_path, len(layers), attention, rope, at)
                blocks["attention"] = attention
            elif step.kind == "mlp":
                others = [b.attr for s in steps for b in s.branches if b.kind != "mlp"]
                if any(b.kind == "mlp" for s in steps for b in s.parallel) or len(others) > 1:
                    feed_forward = an._mlp(layer_path, _only_block(layer, step.attr), "")
                else:
                    feed_forward = an._mlp(layer_path, layer, others[0] if others else "")
                blocks["mlp"] = feed_forward
            elif step.kind == "moe":  # the MoE analysis of the whole model; the layer kinds place it
                moe = analyze_moe(an.tiny, model, dense=False)  # the dense MLP is the "mlp" block
                if moe is None:
                    raise UnsupportedFeature(
                        block_path, "an experts block the MoE analysis does not find", _HINT
                    )
                blocks["moe"] = moe  # its dense MLP kept until the layer kinds are known
            elif step.kind in MIXER_NAMES:
                raise UnsupportedFeature(block_path, f"{MIXER_NAMES[step.kind]}: no template yet", _HINT)
            else:
                raise UnsupportedFeature(
                    block_path, f"{step.kind} block in a hybrid stack: no template yet", _HINT
                )
    if norm_spec is None or norm_spec.kind != "rms" or not norm_spec.weight:
        raise UnsupportedFeature(layers_path, "hybrid layers without RMSNorms: no template yet", _HINT)
    if "moe" in blocks:
        blocks["moe"] = _moe_placement(blocks, all_steps, f"{layers_path}.0", selector, an.tiny)
        _check_shared_mlp_class(blocks, f"{layers_path}.0")
    kinds = []
    for name in dict.fromkeys(names):
        first = names.index(name)
        kinds.append(
            LayerKindSpec(
                short[name], type(layers[first]).__name__, all_steps[first], selectors.get(short[name], ())
            )
        )
    an.notes += [spec.note for spec in blocks.values() if hasattr(spec, "note")]
    an.notes.append(
        "layer kinds " + ", ".join(f"{k.name} x{[short[n] for n in names].count(k.name)}" for k in kinds)
    )
    refused = _attention_gate_switch(an, layers, all_steps, attention)
    hybrid = HybridSpec(
        refused=refused,
        kinds=tuple(kinds),
        order=tuple(short[n] for n in names),
        selector=selector,
        blocks=tuple(blocks.items()),
        norm_class=norm_spec.class_name,
    )
    first_layer = layers[0]
    decoder = DecoderLayerSpec(type(first_layer).__name__, norm_spec, None, None, None, None)
    an._layer_norm_spec = norm_spec
    final_attr = parts["norm"][0] if "norm" in parts else None
    if final_attr is None:
        raise UnsupportedFeature(path, "no final norm", _HINT)
    if an._norm(f"{path}.{final_attr}", parts["norm"][1]) != norm_spec:
        raise UnsupportedFeature(f"{path}.{final_attr}", "final norm differs from the layer norms", _HINT)
    embedding = an._embedding(an.stack, path, parts, first_layer)
    head = an._head(model, inner, final_attr, head_attr)
    return ArchitectureSpec(
        model_type=an.config.model_type,
        config_class=type(an.config).__name__,
        hf_module=type(model).__module__,
        causal_lm_class=type(model).__name__,
        model_class=type(inner).__name__,
        pretrained_class=type(model).__mro__[1].__name__,
        decoder_class=type(first_layer).__name__,
        attention=attention,  # type: ignore[arg-type]
        feed_forward=feed_forward,  # type: ignore[arg-type]
        decoder=decoder,
        embedding=embedding,
        head=head,
        rope=rope,
        layers_attr=layers_attr,
        model_attr=prefix,
        stack_attr=stack_attr,
        stack_class=type(an.stack).__name__ if stack_attr else None,
        tie_word_embeddings=bool(getattr(an.config, "tie_word_embeddings", False)),
        layer_types=(),
        notes=tuple(an.notes),
        hybrid=hybrid,
        ties_head=_class_ties_head(type(model)),
    )


def _attention_gate_switch(
    an: _Analyzer, layers: nn.ModuleList, all_steps: list[tuple[StepSpec, ...]], attention: Any
) -> tuple[tuple[str, bool], ...]:
    """The bool field without which transformers builds the attention without its output gate
    (LFM3's ``use_attention_gate``): the attention template always builds the gate, so the layers
    refuse the other setting."""
    gate = getattr(attention, "gate", None)
    if attention is None or gate is None or getattr(attention, "output_gate", "none") == "none":
        return ()
    index = next(
        i
        for i, steps in enumerate(all_steps)
        if any(b.kind == "attention" for s in steps for b in s.branches)
    )
    found = None
    for name, value in an.fields.items():
        if value is not True:
            continue
        flipped = copy.deepcopy(an.tiny)
        try:
            setattr(flipped, name, False)
            with torch.device("meta"):
                rebuilt = an._rebuilt_layer(layers[index], flipped, index)
            attn = rebuilt.get_submodule(attention.attr)  # still an attention layer
        except Exception:  # noqa: BLE001 - a flip the config or the layer refuses tells nothing
            continue
        if not isinstance(getattr(attn, gate.name, None), nn.Module):
            found = name
            break
    if found is None:
        return ()
    name = found
    an.notes.append(f"config.{name}=False: attention without its output gate, not built by this file")
    return ((name, False),)


def _with_post_norm_flags(
    an: _Analyzer, layer: nn.Module, index: int, steps: tuple[StepSpec, ...]
) -> tuple[StepSpec, ...]:
    """Each sandwich norm's switch: the bool config field whose flip rebuilds the layer with the
    norm as a module without weights (LFM3's ``use_sandwich_norm``: ``nn.Identity``)."""
    found = []
    for step in steps:
        flag = None
        for name, value in an.fields.items() if step.post_norm else ():
            if not isinstance(value, bool):
                continue
            flipped = copy.deepcopy(an.tiny)
            try:
                setattr(flipped, name, not value)
                with torch.device("meta"):
                    rebuilt = an._rebuilt_layer(layer, flipped, index)
                module = rebuilt.get_submodule(step.post_norm)
            except Exception:  # noqa: BLE001 - a flip the config or the layer refuses tells nothing
                continue
            if not any(True for _ in module.parameters()):
                flag = f"config.{name}" if value else f"not config.{name}"
                break
        found.append(dataclasses.replace(step, post_norm_flag=flag))
    return tuple(found)


def _attention_of_subset(
    an: _Analyzer,
    layer_path: str,
    attention_layers: nn.ModuleList,
    all_steps: list[tuple[StepSpec, ...]],
    rope: RopeSpec | None,
) -> tuple[Any, RopeSpec | None]:
    """The attention analysis on the attention layers only: where RoPE tables are per layer type
    (LFM3: none for its "conv" layers), its probes index ``layer_types`` by position in the layers
    handed over, so they see the attention layers' own types for the time of the analysis."""
    types = getattr(an.tiny, "layer_types", None)
    if rope is None or not rope.per_layer_type or not isinstance(types, list) or len(types) != len(all_steps):
        return an._attention(layer_path, attention_layers, rope)
    chosen = [
        i
        for i, steps in enumerate(all_steps)
        if any(b.kind == "attention" for s in steps for b in s.branches)
    ]
    try:
        an.tiny.layer_types = [types[i] for i in chosen]
        return an._attention(layer_path, attention_layers, rope)
    finally:
        an.tiny.layer_types = types


def _only_block(layer: nn.Module, attr: str) -> nn.Module:
    """A shallow copy of ``layer`` whose only block is ``attr`` (its norms kept): the MLP analysis
    then finds one feed-forward among blocks in parallel, and still rebuilds the layer's class."""
    proxy = copy.copy(layer)
    proxy._modules = {
        name: child for name, child in layer._modules.items() if name == attr or block_kind(child) is None
    }
    return proxy


def _class_ties_head(causal_lm: type) -> bool:
    """False where the transformers class declares no tied weights at all (``_tied_weights_keys = {}``:
    NemotronH keeps its head untied even under ``tie_word_embeddings=True``)."""
    keys = getattr(causal_lm, "_tied_weights_keys", None)
    return not (isinstance(keys, (dict, list)) and len(keys) == 0)
