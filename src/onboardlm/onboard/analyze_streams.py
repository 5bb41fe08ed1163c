"""Hyper-connections, measured: decoder layers that carry several residual streams.

DeepSeek-V4, HY-V4 and Qwen4-Exp widen the residual into ``n`` parallel streams that learned,
input-dependent weights mix before and after every block (and a head folds them back before the final
norm). The layers then receive a hidden state of shape ``[B, S, n, hidden]`` (``split``) or
``[B, S, n * hidden]`` (``flat``) instead of ``[B, S, hidden]``. One recorded forward of the tiny model
shows it, whatever the modules are called, and names the modules that read the streams: the layer's
children called on the layer's own input (the mixers, in call order) and the base model's child that
turns the streams back into one hidden state (the head).

Each mixer's form is told by its parameter shapes (one ``[k, n * hidden]`` projection with ``k = 2n``
pre/post logits, ``k = n (n + 2)`` with an ``n x n`` residual mix, or low-rank ``down``/``up`` and an
``n``-wide injection projection) and confirmed by running it on random streams against the reference
formulas below; its constants (epsilons, the post weights' magnitude, Sinkhorn iterations, the norm's
``1 +`` offset) are fitted on a copy of the model built with telling values of the config's float
fields, which names the field each constant reads.

No template wires the streams through a decoder layer yet, so a model with hyper-connections is still
refused; the refusal names the measured form and the next feature the layers need besides (a
token-selection indexer, keys and values compressed along the sequence), found from the same recorded
forward.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.spec_streams import HyperConnectionSpec, MixerForm, StreamLayout, StreamMixerSpec

__all__ = [
    "gated_mix",
    "hyper_connection_refusal",
    "is_additive_mask",
    "measure_hyper_connections",
    "sigmoid_mix",
    "stream_blockers",
]

_HINT = "a template that keeps several residual streams and their mixing weights (hyper-connections)"
_PROBE_TOKENS = 16  # long enough for keys compressed in blocks of 4 to show
_TOL = 1e-5


# ------------------------------------------------------------------------------- reference formulas


def _rsqrt_mean_square(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def sigmoid_mix(
    streams: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    *,
    norm_eps: float,
    eps: float,
    post_scale: float = 1.0,
    post_eps: float = 0.0,
    iterations: int | None = None,
) -> dict[str, torch.Tensor]:
    """The ``sigmoid`` / ``sinkhorn`` mixers (and, with ``fn`` of ``n`` rows, their head) on streams
    ``[B, S, n, D]``, in fp32: the block input ``collapsed``, the per-stream ``post`` weights and, with
    ``iterations``, the doubly-stochastic residual mix ``comb`` (``new = comb^T @ h + post * out``)."""
    n = streams.shape[2]
    flat = streams.flatten(2).float()
    mixes = F.linear(flat, fn.float()) * _rsqrt_mean_square(flat, norm_eps)
    pre = torch.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + eps
    out = {"collapsed": (pre.unsqueeze(-1) * streams.float()).sum(dim=2)}
    if fn.shape[0] == n:  # the head: pre weights only
        return out
    out["post"] = post_scale * torch.sigmoid(mixes[..., n : 2 * n] * scale[1] + base[n : 2 * n]) + post_eps
    if iterations is not None:
        logits = mixes[..., 2 * n :].unflatten(-1, (n, n)) * scale[2] + base[2 * n :].view(n, n)
        comb = torch.softmax(logits, dim=-1) + eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        for _ in range(iterations - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        out["comb"] = comb
    return out


def gated_mix(
    streams: torch.Tensor,
    norm_weight: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    inject: torch.Tensor | None,
    *,
    norm_eps: float,
    norm_offset: float,
    divisor: float,
    inject_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The ``gated`` mixer (and, without ``inject``, its head) on streams ``[B, S, n, D]``, in fp32:
    each stream RMS-normed, weighted per channel by ``sigmoid(up(silu(down(x) / divisor)))``, the block
    input their mean; ``post = inject_scale * sigmoid(inject(x) / divisor)`` adds the block output
    back to the un-normed streams."""
    n, width = streams.shape[2], streams.shape[3]
    xs = streams.float()
    normed = xs * _rsqrt_mean_square(xs, norm_eps) * (norm_offset + norm_weight.float().view(n, width))
    flat = normed.flatten(2)
    weights = torch.sigmoid(F.linear(F.silu(F.linear(flat, down.float()) / divisor), up.float()))
    out = {"collapsed": (weights.unflatten(-1, (n, width)) * normed).mean(dim=-2)}
    if inject is not None:
        out["post"] = inject_scale * torch.sigmoid(F.linear(flat, inject.float()) / divisor)
    return out


# -------------------------------------------------------------------------------------- recording


def _layer_stack(model: nn.Module, layers: int) -> tuple[str, nn.ModuleList] | None:
    return next(
        (
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) == layers and name
        ),
        None,
    )


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


class _Call:
    def __init__(self, path: str, module: nn.Module, inputs: list[torch.Tensor], outputs: list[torch.Tensor]):
        self.path, self.module, self.inputs, self.outputs = path, module, inputs, outputs


def _record(model: nn.Module, tokens: int) -> list[_Call] | None:
    """Every module call of one forward of ``model`` on ``tokens`` random ids, in call order."""
    calls: list[_Call] = []
    hooks = []

    def hook(path: str) -> Callable:
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            first = args[0] if args else next(iter(kwargs.values()), None)
            calls.append(_Call(path, module, _tensors(first), _tensors(output)))

        return record

    for path, module in model.named_modules():
        if path:
            hooks.append(module.register_forward_hook(hook(path), with_kwargs=True))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(2, getattr(model.config, "vocab_size", 2)), (1, tokens), generator=generator)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    except Exception:  # noqa: BLE001 - no recorded forward, no evidence either way
        return None
    finally:
        for handle in hooks:
            handle.remove()
    return calls


def _stream_shape(shape: tuple[int, ...], hidden: int, tokens: int) -> tuple[int, StreamLayout] | None:
    if shape[:2] != (1, tokens):
        return None
    rest = shape[2:]
    if len(rest) == 2 and rest[1] == hidden and rest[0] > 1:
        return rest[0], "split"
    if len(rest) == 1 and rest[0] % hidden == 0 and rest[0] > hidden:
        return rest[0] // hidden, "flat"
    return None


# ------------------------------------------------------------------------------------- measurement


def _forms(module: nn.Module, streams: int, hidden: int) -> tuple[MixerForm, dict[str, str], bool] | None:
    """(form, role -> checkpoint name, whether it is a head) from the parameter shapes, else None."""
    params = dict(module.named_parameters())
    wide = streams * hidden
    matrices = {n: p for n, p in params.items() if p.dim() == 2}
    vectors = {n: p for n, p in params.items() if p.dim() == 1}
    if len(params) == 3 and len(matrices) == 1:
        ((fn_name, fn),) = matrices.items()
        rows = fn.shape[0]
        base = next((n for n, v in vectors.items() if v.shape[0] == rows), None)
        scale = next((n for n, v in vectors.items() if n != base), None)
        if fn.shape[1] == wide and base and scale:
            width = params[scale].shape[0]
            roles = {"fn": fn_name, "base": base, "scale": scale}
            if rows == streams and width == 1:
                return "sigmoid", roles, True  # the head: one weight per stream
            if rows == 2 * streams and width == 2:
                return "sigmoid", roles, False
            if rows == streams * (streams + 2) and width == 3:
                return "sinkhorn", roles, False
        return None
    linears = {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear) and m.bias is None}
    norm = [n for n, v in vectors.items() if v.shape[0] == wide]
    if len(norm) != 1 or len(params) != len(linears) + 1:
        return None
    roles = {"norm": norm[0]}
    for name, linear in linears.items():
        if linear.in_features == wide and linear.out_features == streams:
            roles["inject"] = f"{name}.weight"
        elif linear.in_features == wide:
            roles["down"] = f"{name}.weight"
        elif linear.out_features == wide:
            roles["up"] = f"{name}.weight"
    if {"down", "up"} <= set(roles) and len(roles) == len(linears) + 1:
        down, up = params[roles["down"]], params[roles["up"]]
        if up.shape[1] == down.shape[0]:
            return "gated", roles, "inject" not in roles
    return None


def _slots(form: MixerForm, head: bool) -> list[str]:
    if form == "gated":
        return ["norm_eps", "norm_offset", "divisor"] + ([] if head else ["inject_scale"])
    slots = ["norm_eps", "eps"] + ([] if head else ["post_scale", "post_eps"])
    return slots + (["iterations"] if form == "sinkhorn" else [])


def _reference(
    form: MixerForm, roles: dict[str, str], module: nn.Module, streams: torch.Tensor, values: dict[str, Any]
) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    if form == "gated":
        return gated_mix(
            streams,
            params[roles["norm"]],
            params[roles["down"]],
            params[roles["up"]],
            params[roles["inject"]] if "inject" in roles else None,
            **{k: v for k, v in values.items()},
        )
    post_eps = values.get("post_eps", 0.0)
    return sigmoid_mix(
        streams,
        params[roles["fn"]],
        params[roles["base"]],
        params[roles["scale"]],
        norm_eps=values["norm_eps"],
        eps=values["eps"],
        post_scale=values.get("post_scale", 1.0),
        post_eps=values["eps"] if post_eps == "eps" else post_eps,
        iterations=values.get("iterations"),
    )


def _matches(
    outputs: list[torch.Tensor],
    reference: dict[str, torch.Tensor],
    streams: torch.Tensor,
    partial: bool = False,
) -> bool:
    """Every output of the module is one of the reference tensors (or the streams themselves, which a
    mixer may hand back as the residual), and every reference tensor is among the outputs; with
    ``partial``, outputs the reference does not hold (yet) are let through."""
    candidates = [*reference.items(), ("streams", streams)]
    seen: set[str] = set()
    for output in outputs:
        match = next(
            (
                name
                for name, candidate in candidates
                if output.numel() == candidate.numel()
                and torch.allclose(
                    output.float().reshape(candidate.shape), candidate.float(), rtol=_TOL, atol=_TOL
                )
            ),
            None,
        )
        if match is None and not partial:
            return False
        seen.add(match)
    return set(reference) <= seen


def _fit(
    form: MixerForm,
    roles: dict[str, str],
    module: nn.Module,
    streams: torch.Tensor,
    outputs: list[torch.Tensor],
    candidates: dict[str, list[tuple[str, Any]]],
    head: bool,
) -> dict[str, str] | None:
    """The constants (slot -> expression) whose reference matches the module's outputs, else None.
    The Sinkhorn iterations are fitted last, the other constants fixed by the outputs that do not
    depend on them (a product over every slot would run the iterations thousands of times)."""
    slots = [slot for slot in _slots(form, head) if slot != "iterations"]
    last = ["iterations"] if "iterations" in _slots(form, head) else []
    for choice in itertools.product(*(candidates[slot] for slot in slots)):
        values = {slot: value for slot, (_, value) in zip(slots, choice, strict=True)}
        fitted = {slot: expression for slot, (expression, _) in zip(slots, choice, strict=True)}
        try:
            reference = _reference(form, roles, module, streams, values)
        except (RuntimeError, ValueError, TypeError):
            return None
        if not _matches(outputs, reference, streams, partial=bool(last)):
            continue
        if not last:
            return fitted
        for expression, value in candidates["iterations"]:
            reference = _reference(form, roles, module, streams, {**values, "iterations": value})
            if _matches(outputs, reference, streams):
                return {**fitted, "iterations": expression}
    return None


def _telling(config: PretrainedConfig) -> tuple[PretrainedConfig, dict[str, float]]:
    """A copy of ``config`` whose float fields hold telling values (epsilons made large enough to
    show), and those values by field."""
    telling = copy.deepcopy(config)
    values: dict[str, float] = {}
    floats = sorted(k for k, v in config.to_dict().items() if isinstance(v, float) and v > 0)
    for index, name in enumerate(floats):
        value = getattr(config, name, None)
        if not isinstance(value, float):
            continue
        new = 1e-3 * (index + 2) if value < 1e-3 else round(value + 0.125 * (index + 1), 6)
        try:
            setattr(telling, name, new)
        except (AttributeError, TypeError, ValueError):
            continue
        values[name] = new
    return telling, values


def _candidates(
    values: dict[str, float], ints: dict[str, int], streams_expression: str, streams: int
) -> dict[str, list[tuple[str, Any]]]:
    fields = [(f"config.{name}", value) for name, value in values.items()]
    literals = [("1.0", 1.0), ("2.0", 2.0)]
    eps_like = [(e, v) for e, v in fields if v < 0.1]
    return {
        "norm_eps": eps_like,
        "eps": eps_like,
        "post_scale": [*literals, *fields],
        "post_eps": [("0.0", 0.0), ("eps", "eps")],
        "iterations": [(f"config.{name}", value) for name, value in ints.items() if 1 <= value <= 100],
        "norm_offset": [("0.0", 0.0), ("1.0", 1.0)],
        "divisor": [("1.0", 1.0), (streams_expression, float(streams))],
        "inject_scale": [*literals, *fields],
    }


def _int_field(config: PretrainedConfig, module: nn.Module, value: int) -> str:
    """The config field that sets a width of ``module`` (the stream count, a rank): of the int fields
    equal to ``value``, the one whose change changes the module's parameter shapes (the module
    rebuilt from a copy of the config); the literal where none does."""
    names = [k for k, v in config.to_dict().items() if type(v) is int and v == value]
    if len(names) == 1:
        return f"config.{names[0]}"
    shapes = [tuple(p.shape) for p in module.parameters()]
    for name in names:
        flipped = copy.deepcopy(config)
        try:
            setattr(flipped, name, value + 1)
            rebuilt = type(module)(flipped)
        except Exception:  # noqa: BLE001 - a module class that is not built from the config alone
            continue
        if [tuple(p.shape) for p in rebuilt.parameters()] != shapes:
            return f"config.{name}"
    return str(value)


def _iterations_field(
    module: nn.Module,
    config: PretrainedConfig,
    given: torch.Tensor,
    outputs: list[torch.Tensor],
    fitted: str,
    candidates: dict[str, list[tuple[str, Any]]],
) -> str:
    """Of the int fields whose value fits the Sinkhorn iterations (they converge, so several may), the
    one whose change to 1 changes the mixer's outputs (the module rebuilt from a copy of its config)."""
    state = module.state_dict()
    for expression, _value in candidates["iterations"]:
        flipped = copy.deepcopy(config)
        try:
            setattr(flipped, expression.removeprefix("config."), 1)
            rebuilt = type(module)(flipped).float()
            rebuilt.load_state_dict(state)
            with torch.no_grad():
                changed = _tensors(rebuilt(given))
        except Exception:  # noqa: BLE001 - shapes change with the field, or the class needs more
            continue
        if len(changed) == len(outputs) and any(
            not torch.allclose(a, b, rtol=_TOL, atol=_TOL) for a, b in zip(changed, outputs, strict=True)
        ):
            return expression
    return fitted


def _probe_model(model: nn.Module, config: PretrainedConfig) -> tuple[nn.Module, dict[str, float]]:
    """The tiny model rebuilt with telling float fields and the same weights, and those values; the
    model itself (and its config's values) where the rebuild fails."""
    telling, values = _telling(config)
    try:
        rebuilt = AutoModelForCausalLM.from_config(telling, attn_implementation="eager", dtype=torch.float32)
        rebuilt.load_state_dict(model.state_dict(), strict=False)
        return rebuilt.float().eval(), values
    except Exception:  # noqa: BLE001 - a float field the config class checks: measure the values as they are
        return model, {k: v for k, v in config.to_dict().items() if isinstance(v, float) and v > 0}


def _mixer(
    path: str,
    module: nn.Module,
    probe: nn.Module,
    streams: int,
    layout: StreamLayout,
    hidden: int,
    candidates: dict[str, list[tuple[str, Any]]],
    config: PretrainedConfig,
) -> StreamMixerSpec:
    found = _forms(module, streams, hidden)
    shapes = ", ".join(f"{n} {list(p.shape)}" for n, p in module.named_parameters())
    if found is None:
        raise UnsupportedFeature(
            path,
            f"hyper-connections: the stream mixer {type(module).__name__} ({shapes}) has parameters of"
            " no known form (sigmoid pre/post weights, a Sinkhorn residual mix, gated low-rank weights)",
            _HINT,
        )
    form, roles, head = found
    generator = torch.Generator().manual_seed(1)
    probe = copy.deepcopy(probe)
    with torch.no_grad():  # telling weights: scales near one, so that every epsilon shows
        for parameter in probe.parameters():
            parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator))
            if parameter.dim() == 2:
                parameter.mul_(torch.randn(parameter.shape, generator=generator) / parameter.shape[1] ** 0.5)
    # small streams: their mean square (~1e-2) is of the order of the telling epsilons
    split = 0.1 * torch.randn(2, 5, streams, hidden, generator=generator)
    given = split if layout == "split" else split.flatten(2)
    with torch.no_grad():
        outputs = _tensors(probe(given))
        constants = _fit(form, roles, probe, split, outputs, candidates, head)
    if constants is not None and constants.get("iterations", "").startswith("config."):
        constants["iterations"] = _iterations_field(
            probe, config, given, outputs, constants["iterations"], candidates
        )
    if constants is None:
        raise UnsupportedFeature(
            path,
            f"hyper-connections: the stream mixer {type(module).__name__} ({shapes}) has the parameters of"
            f" the {form} form but computes something else on probe streams",
            _HINT,
        )
    if form == "gated":  # the width of the low-rank weights: the config field that sets it
        rank = dict(module.named_parameters())[roles["down"]].shape[0]
        constants["lowrank"] = _int_field(config, module, rank)
    return StreamMixerSpec(
        attr=path.rsplit(".", 1)[-1],
        form=form,
        params=tuple(sorted(roles.items())),
        constants=tuple(constants.items()),
        class_name=type(module).__name__,
    )


def _streams_seen(
    model: nn.Module, config: PretrainedConfig
) -> tuple[str, list[_Call], int, StreamLayout, tuple[int, ...]] | None:
    """(layer-list path, the recorded calls, stream count, layout, layer input shape) where one
    recorded forward shows the decoder layers receiving several streams, else None."""
    hidden, layers = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
    found = _layer_stack(model, layers) if isinstance(layers, int) and layers > 0 else None
    if found is None or not isinstance(hidden, int):
        return None
    stack_path = found[0]
    calls = _record(model, _PROBE_TOKENS)
    entry = next((c for c in calls or [] if c.path == f"{stack_path}.0" and c.inputs), None)
    measured = _stream_shape(tuple(entry.inputs[0].shape), hidden, _PROBE_TOKENS) if entry else None
    if measured is None:
        return None
    return stack_path, calls, *measured, tuple(entry.inputs[0].shape)


def measure_hyper_connections(
    model: nn.Module, config: PretrainedConfig, seen: tuple | None = None
) -> HyperConnectionSpec | None:
    """The residual streams of ``model`` (the tiny transformers model of ``config``), or None where its
    layers carry one hidden state; UnsupportedFeature where a module that mixes the streams is of no
    known form."""
    seen = seen or _streams_seen(model, config)
    if seen is None:
        return None
    stack_path, calls, streams, layout, stream_shape = seen
    hidden, layer0 = config.hidden_size, f"{stack_path}.0"
    owner = stack_path.rsplit(".", 1)[0] if "." in stack_path else ""
    mixers = [
        c
        for c in calls
        if c.path.startswith(f"{layer0}.")
        and c.path.count(".") == layer0.count(".") + 1
        and c.inputs
        and tuple(c.inputs[0].shape) == stream_shape
        and any(True for _ in c.module.parameters())
    ]
    heads = [
        c
        for c in calls
        if c.path.startswith(f"{owner}.")
        and c.path.count(".") == owner.count(".") + 1
        and c.inputs
        and tuple(c.inputs[0].shape) == stream_shape
        and c.outputs
        and tuple(c.outputs[0].shape) == (1, _PROBE_TOKENS, hidden)
    ]
    if not mixers or len(heads) != 1:
        raise UnsupportedFeature(
            layer0,
            f"hyper-connections: the decoder layers carry {streams} residual streams (hidden state"
            f" {list(stream_shape)} for hidden_size {hidden}) but no {'mixer' if not mixers else 'single head'}"
            " that reads them was found",
            _HINT,
        )
    ints = {k: v for k, v in config.to_dict().items() if type(v) is int}
    streams_expression = _int_field(config, mixers[0].module, streams)
    probe, values = _probe_model(model, config)
    probe_modules = dict(probe.named_modules())
    telling = getattr(probe, "config", config)
    candidates = _candidates(values, ints, streams_expression, streams)
    specs = [
        _mixer(c.path, c.module, probe_modules[c.path], streams, layout, hidden, candidates, telling)
        for c in mixers
    ]
    head_call = heads[0]
    head = _mixer(
        head_call.path,
        head_call.module,
        probe_modules[head_call.path],
        streams,
        layout,
        hidden,
        candidates,
        telling,
    )
    return HyperConnectionSpec(
        streams=streams_expression,
        streams_value=streams,
        layout=layout,
        mixers=tuple(specs),
        head=head,
    )


# --------------------------------------------------------------------------------------- refusal


def is_additive_mask(tensor: torch.Tensor) -> bool:
    """A float tensor holding only 0 (attend) and the dtype's lowest value or -inf (masked), with some
    entries masked: the additive form of a boolean selection (Qwen4-Exp's indexer under eager attention on
    transformers 5.17; later releases return the boolean mask)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return False
    masked = tensor <= torch.finfo(tensor.dtype).min
    return bool(((tensor == 0) | masked).all() and masked.any())


def stream_blockers(
    model: nn.Module,
    config: PretrainedConfig,
    mixers: set[str] = frozenset(),
    calls: list[_Call] | None = None,
) -> list[tuple[str, str]]:
    """Other features of the layers, found from one recorded forward: a module inside a block whose
    output is a boolean mask or integer indices over the keys (a token-selection indexer), or whose
    output is shorter along the sequence than its input (keys and values compressed in blocks)."""
    layers = getattr(config, "num_hidden_layers", None)
    found = _layer_stack(model, layers) if isinstance(layers, int) and layers > 0 else None
    calls = calls or (_record(model, _PROBE_TOKENS) if found else None)
    if not calls or found is None:
        return []
    stack_path = found[0]
    blockers: dict[str, tuple[str, str]] = {}
    produced: list[torch.Tensor] = []  # outputs already reported: an enclosing block hands them on
    for call in calls:
        if not call.path.startswith(f"{stack_path}.") or any(
            call.path == m or call.path.startswith(f"{m}.") for m in mixers
        ):
            continue
        kind = type(call.module).__name__
        if kind in blockers or not any(True for _ in call.module.parameters()):
            continue
        # a selection per query: [1, S, k] indices or a [1, 1, S, S] mask, boolean or additive (a
        # router's [tokens, k] is not)
        selects = [
            o
            for o in call.outputs
            if (o.dtype == torch.bool or not o.is_floating_point() or is_additive_mask(o))
            and o.dim() >= 3
            and o.shape[0] == 1
            and _PROBE_TOKENS in tuple(o.shape[1:])
            and not any(o is p for p in produced)
        ]
        if selects:
            produced += selects
            dtype = str(selects[0].dtype).replace("torch.", "")
            blockers[kind] = (
                call.path,
                f"a token-selection indexer ({kind} returns {dtype} {list(selects[0].shape)}: the keys each"
                " query may attend to) that matches no indexer template",
            )
            continue
        # keys and values along a shorter axis before the features ([1, S', D] or [1, H, S', D]),
        # the sequence length nowhere else in the shape
        floats = [
            o
            for o in call.outputs
            if o.is_floating_point()
            and o.dim() >= 3
            and o.shape[0] == 1
            and o.shape[-2] < _PROBE_TOKENS
            and _PROBE_TOKENS not in tuple(o.shape[1:-1])
        ]
        inputs = [i for i in call.inputs if i.is_floating_point() and i.dim() == 3]
        if (
            floats
            and inputs
            and tuple(inputs[0].shape[:2]) == (1, _PROBE_TOKENS)
            and not any(floats[0] is p for p in produced)
        ):
            produced.append(floats[0])
            entries = floats[0].shape[-2]
            out = f"{entries} entries out" if entries else "none out: its blocks are longer"
            blockers[kind] = (
                call.path,
                f"keys and values compressed along the sequence ({kind}: {_PROBE_TOKENS} tokens in,"
                f" {out}); no attention template compresses keys",
            )
    return list(blockers.values())


def hyper_connection_refusal(model: nn.Module, config: PretrainedConfig) -> UnsupportedFeature | None:
    """The refusal for a model whose decoder layers receive several residual streams, else None: the
    streams and their measured mixing form, and the next feature the layers need besides."""
    seen = _streams_seen(model, config)
    if seen is None:
        return None
    try:
        spec = measure_hyper_connections(model, config, seen)
    except UnsupportedFeature as err:
        return err
    except Exception as err:  # noqa: BLE001 - a mixer the probes do not foresee: the streams, as seen
        stack_path, _calls, streams, _layout, shape = seen
        return UnsupportedFeature(
            f"{stack_path}.0",
            f"hyper-connections: the decoder layers carry {streams} residual streams (hidden state"
            f" {list(shape)} for hidden_size {config.hidden_size}) mixed by learned weights around every"
            f" block; measuring the mixers failed ({type(err).__name__}: {' '.join(str(err).split())})",
            _HINT,
        )
    if spec is None:
        return None
    layers = getattr(config, "num_hidden_layers", 0)
    stack = _layer_stack(model, layers)
    layer0 = f"{stack[0]}.0" if stack else "layers.0"
    mixer_paths = {f"{stack[0]}.{i}.{m.attr}" for i in range(layers) for m in spec.mixers} if stack else set()
    blockers = stream_blockers(model, config, mixer_paths, seen[1])
    streams = f"hyper-connections: the decoder layers carry {spec.describe()}"
    if blockers:
        path, feature = blockers[0]
        also = "; ".join(f"{p}: {f}" for p, f in blockers[1:])
        return UnsupportedFeature(
            path,
            f"{feature}{f' (also {also})' if also else ''}; besides, {streams} (measured; no decoder-layer"
            " template wires the streams yet)",
            "an attention template for that feature, then a decoder-layer template around the stream mixers",
        )
    return UnsupportedFeature(layer0, f"{streams}; no decoder-layer template wires the streams yet", _HINT)
