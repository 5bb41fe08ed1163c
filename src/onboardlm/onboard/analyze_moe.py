"""Measure mixture-of-experts blocks and multi-head latent attention from a built HuggingFace model.

The analyzer builds the HF model on a tiny config; these functions read its MoE and MLA modules
(children, parameter shapes) and probe them on random tokens: the router for its scoring and
normalisation, the packed experts for their layout, the gated MLPs for their wiring. Every value the generated file
needs at run time is recorded as the *config field* that carries it (found by value on the tiny
config), so the emitted code reads the real config, not the tiny one.
"""

from __future__ import annotations

import ast
import copy
import inspect
import math
import re
import textwrap
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.analyze_indexer import analyze_mla_indexer, rotates_channel_pairs
from onboardlm.onboard.block_routing import BlockRouting, routing_view
from onboardlm.onboard.spec_moe import (
    MOE_ACTIVATIONS,
    ExpertsSpec,
    IndexerSpec,
    MLASpec,
    MoESpec,
    PackedExperts,
    RouterSpec,
    SharedExpertSpec,
)

__all__ = ["analyze_mla", "analyze_moe", "model_prefix"]

_EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
_TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k_experts")
_EXPERT_WIDTH_FIELDS = ("moe_intermediate_size", "intermediate_size")
_SHARED_WIDTH_FIELDS = ("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size")
_SHARED_COUNT_FIELDS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
_ROUTER_ATTRS = ("gate", "router")
_SHARED_ATTRS = ("shared_expert", "shared_experts")
_PROBE_TOKENS = 64
_PACKED_KEYS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


def model_prefix(config: PretrainedConfig) -> str:
    """Class-name prefix of an architecture: ``Qwen3MoeConfig`` -> ``Qwen3Moe``."""
    return type(config).__name__.removesuffix("Config")


def _field_with_value(
    config: PretrainedConfig, candidates: tuple[str, ...], value: object, where: str, what: str
) -> str:
    for name in candidates:
        if getattr(config, name, None) == value:
            return name
    raise UnsupportedFeature(
        where, f"{what} = {value!r} is not any of the config fields {', '.join(candidates)}"
    )


def _field_or_literal(config: PretrainedConfig, field: str, value: float, where: str) -> str:
    """``getattr(config, field, value)`` when the config carries ``field`` (checked equal to the measured
    ``value``), else the literal ``value`` (older releases hard-code it in the module)."""
    if not hasattr(config, field):
        return repr(value)
    _field_with_value(config, (field,), value, where, field.replace("_", " "))
    return f"getattr(config, {field!r}, {value!r})"


def _int_fields(config: PretrainedConfig, preferred: tuple[str, ...]) -> list[str]:
    """The config's integer fields (and aliases among ``preferred``), ``preferred`` first (in their
    order), then the others by name."""
    fields = {
        name: value
        for name, value in vars(config).items()
        if isinstance(value, int) and not isinstance(value, bool) and not name.startswith("_")
    }
    mapped = [n for n in preferred if isinstance(getattr(config, n, None), int) and n not in fields]
    for name in mapped:  # an attribute_map alias (DeepSeek's num_local_experts) is no instance attribute
        fields[name] = getattr(config, name)
    return [n for n in preferred if n in fields] + sorted(n for n in fields if n not in preferred)


def _measured_expression(
    config: PretrainedConfig,
    block: nn.Module,
    candidates: list[tuple[str, str]],
    known: tuple[str, ...],
    measure: Callable[[nn.Module], int],
    where: str,
    what: str,
    value: int,
) -> str:
    """The first of ``candidates`` ((expression over ``config``, the field it varies)) that the block
    follows: the block rebuilt from a config with that field doubled must measure the expression's new
    value. A field of ``known`` names is taken on its value alone when the block cannot be rebuilt
    from the probe config; any other field only when the rebuilt block confirms it.
    """
    for expr, field in candidates:
        probe = copy.deepcopy(config)
        setattr(probe, field, 2 * getattr(config, field))
        try:
            rebuilt = measure(type(block)(probe))
        except Exception:  # noqa: BLE001 - a config the block cannot be built from confirms nothing
            rebuilt = None
        if rebuilt is None:
            if field in known:
                return expr
            continue
        if rebuilt == eval(expr, {"__builtins__": {}}, {"config": probe}):  # noqa: S307 - our expression
            return expr
    raise UnsupportedFeature(where, f"{what} = {value!r} follows no config field (rebuilt with each doubled)")


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The base model's one ModuleList child (``layers``, GPT-2's ``h``), inside its only child where
    the base model wraps a decoder stack (OPT's ``model.decoder``)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None:  # a prefix that names no child (Llama 4's "language_model" over ``.model``)
        embeddings = model.get_input_embeddings()
        owners = [c for c in model.children() if any(m is embeddings for m in c.modules())]
        base = owners[0] if len(owners) == 1 else model
    children = [child for child in base.children() if not isinstance(child, nn.Dropout)]
    if len(children) == 1 and not isinstance(children[0], nn.ModuleList):
        base = children[0]
    lists = [
        child
        for child in base.children()
        if isinstance(child, nn.ModuleList)  # not a list of rotary modules (one per RoPE base)
        and not all(any("inv_freq" in name for name, _ in item.named_buffers()) for item in child)
    ]
    if len(lists) != 1:
        raise UnsupportedFeature(type(model).__name__, "no single ModuleList of layers in the base model")
    return lists[0]


def _moe_child(layer: nn.Module) -> tuple[str, nn.Module] | None:
    """The child of a decoder layer that holds routed experts (an ``experts`` submodule)."""
    return next(((name, child) for name, child in layer.named_children() if hasattr(child, "experts")), None)


# --------------------------------------------------------------------------------------------------
# MoE
# --------------------------------------------------------------------------------------------------


def analyze_moe(config: PretrainedConfig, model: nn.Module, dense: bool = True) -> MoESpec | None:
    """The MoE block of ``model`` (built from ``config``), or None when no layer routes to experts.

    ``dense=False``: the dense layers' MLP is measured by the caller (a hybrid stack's own MLP block):
    the spec has no dense class, only the layer rule."""
    layers = _decoder_layers(model)
    found = [(i, _moe_child(layer)) for i, layer in enumerate(layers)]
    moe = [(i, child) for i, child in found if child is not None]
    if not moe:
        return None
    first_idx, (attr, block) = moe[0]
    path = f"model.layers.{first_idx}.{attr}"
    classes = {type(child[1]).__name__ for _, child in moe}
    if len(classes) > 1:
        raise UnsupportedFeature(path, f"several MoE block classes ({', '.join(sorted(classes))})")
    moe_layers = tuple(i for i, _ in moe)
    experts = _analyze_experts(config, block, f"{path}.experts", attr)
    condition = _layer_condition(
        config, moe_layers, len(layers), path, layers[first_idx], attr, type(block).__name__
    )
    dense_class, dense_width, mlp_bias, clamp = (
        _dense_class(config, layers, attr, moe_layers, condition) if dense else (None, None, "False", None)
    )
    router = _analyze_router(config, block, path)
    shared = _analyze_shared(config, block, path, experts)
    post_norm = _post_norm(config, block, path, router, shared)
    _check_block_state(block, path, router, shared, post_norm)
    scaling = None if post_norm else _block_scaling_field(config, block, path, router, shared)
    on_input = _routing_on_input(block, router, shared)
    if shared is not None:
        shared_bias = _mlp_bias_expression(config, getattr(block, shared.attr))
        if dense_class is not None and shared_bias != mlp_bias:
            raise UnsupportedFeature(
                f"{path}.{shared.attr}", f"shared expert bias {shared_bias}, dense MLP bias {mlp_bias}"
            )
        mlp_bias = shared_bias
        shared_mlp = getattr(block, shared.attr)
        shared_clamp = (
            None if shared.plain_act else _check_gated_mlp(config, shared_mlp, path, _mlp_width(shared_mlp))
        )
        if dense_class is not None and shared_clamp != clamp:
            raise UnsupportedFeature(
                f"{path}.{shared.attr}", "shared expert and dense MLP of different kinds"
            )
        clamp = shared_clamp
    return MoESpec(
        class_name=type(block).__name__,
        attr=attr,
        config_class=type(config).__name__,
        prefix=model_prefix(config),
        router=router,
        experts=experts,
        shared=shared,
        layer_condition=condition,
        moe_layers=moe_layers,
        dense_class=dense_class,
        dense_width_expr=dense_width,
        mlp_bias=mlp_bias,
        post_norm=post_norm,
        scaling_field=scaling,
        mlp_swiglu=None if clamp is None else _clamp_expressions(config, clamp, path),
        routing_on_input=on_input,
    )


@torch.no_grad()
def _routing_on_input(block: nn.Module, router: RouterSpec, shared: SharedExpertSpec | None) -> bool:
    """Whether the block scales each chosen expert's input by its routing weight (Llama 4) rather than
    its output: the block's output (less its shared expert) against both, from the router's own choice
    and each expert run alone. False where the parts cannot be called alone (the verify tests decide)."""
    experts = block.experts
    if takes_routing(experts) or router.correction_bias == "block":
        return False  # transformers 5 experts take the routing weights and apply them themselves
    hidden = router_weight(_router_of(block, router)).shape[1]
    x = torch.randn(2, 5, hidden, generator=torch.Generator().manual_seed(5))
    tokens = x.reshape(-1, hidden)
    try:
        out = block(x)
        out = (out[0] if isinstance(out, tuple) else out).reshape(tokens.shape)
        if shared is not None:
            out = out - getattr(block, shared.attr)(tokens)
        _, weights, ids = _call_router(_router_of(block, router), tokens)
        on_output, on_input = torch.zeros_like(out), torch.zeros_like(out)
        for k in range(ids.shape[1]):
            w = weights[:, k : k + 1]
            for expert in ids[:, k].unique().tolist():
                rows = ids[:, k] == expert
                on_output[rows] += (w * _expert_output(experts, tokens, expert))[rows]
                on_input[rows] += _expert_output(experts, w * tokens, expert)[rows]
    except Exception:  # noqa: BLE001 - parts that cannot be called alone
        return False
    return torch.allclose(out, on_input, rtol=1e-4, atol=1e-5) and not torch.allclose(
        out, on_output, rtol=1e-4, atol=1e-5
    )


def _clamp_expressions(config: PretrainedConfig, clamp: tuple[float, float], where: str) -> tuple[str, str]:
    """(alpha, limit) expressions of a clamped SwiGLU: the config's ``swiglu_alpha``/``swiglu_limit``
    (checked equal) or literals."""
    return (
        _field_or_literal(config, "swiglu_alpha", clamp[0], where),
        _field_or_literal(config, "swiglu_limit", clamp[1], where),
    )


@torch.no_grad()
def _routed_scale(block: nn.Module, router: RouterSpec, shared: SharedExpertSpec | None) -> float | None:
    """c such that the block's output is c x (its experts on its router's choice) + its shared expert,
    or None when it is not of that form (or the parts cannot be called on their own)."""
    hidden = router_weight(_router_of(block, router)).shape[1]
    x = torch.randn(2, 5, hidden, generator=torch.Generator().manual_seed(4))
    tokens = x.reshape(-1, hidden)
    try:
        out = block(x)
        out = (out[0] if isinstance(out, tuple) else out).reshape(tokens.shape)
        bias = (getattr(block, router.correction_name),) if router.correction_bias == "block" else ()
        _, weights, ids = _call_router(_router_of(block, router), tokens, *bias)
        routed = block.experts(tokens, ids, weights).reshape(tokens.shape)
        if shared is not None:
            extra = getattr(block, shared.attr)(tokens)
            if shared.gate_attr:
                extra = torch.sigmoid(getattr(block, shared.gate_attr)(tokens)) * extra
            out = out - extra
    except Exception:  # noqa: BLE001 - parts that cannot be called alone: no scale is measured
        return None
    scale = float((out * routed).sum() / (routed * routed).sum())
    return scale if torch.allclose(out, routed * scale, rtol=1e-4, atol=1e-5) else None


def _block_scaling_field(
    config: PretrainedConfig, block: nn.Module, path: str, router: RouterSpec, shared: SharedExpertSpec | None
) -> str | None:
    """The float config field the MoE block multiplies its routed experts' output by (Beam's and
    MiniMax-M3's ``routed_scaling_factor``, applied after the experts, not in the router): measured, then
    confirmed on the block rebuilt from a config with the field changed; None when unscaled."""
    scale = _routed_scale(block, router, shared)
    if scale is None or math.isclose(scale, 1.0, rel_tol=1e-4):
        return None
    for name, value in sorted(vars(config).items()):
        if not isinstance(value, float) or not math.isclose(value, scale, rel_tol=1e-4):
            continue
        probe = copy.deepcopy(config)
        setattr(probe, name, 2.5 * value + 0.5)
        try:
            rebuilt = type(block)(probe)
            rebuilt.load_state_dict(block.state_dict())
        except Exception:  # noqa: BLE001 - a value the block cannot be built with is not its scale
            continue
        rescaled = _routed_scale(rebuilt.to(router_weight(_router_of(block, router)).dtype), router, shared)
        if rescaled is not None and math.isclose(rescaled, 2.5 * value + 0.5, rel_tol=1e-4):
            return name
    raise UnsupportedFeature(path, f"routed experts' output scaled by {scale:.6g}, by no config field")


def _known_children(router: RouterSpec, shared: SharedExpertSpec | None) -> set[str | None]:
    known = {router.attr, "experts"}
    if shared is not None:
        known |= {shared.attr, shared.gate_attr}
    return known


@torch.no_grad()
def _post_norm(
    config: PretrainedConfig, block: nn.Module, path: str, router: RouterSpec, shared: SharedExpertSpec | None
) -> tuple[str, str] | None:
    """(attribute, norm class) of a norm the block applies to its output (A.X-K1's
    ``post_mlp_layernorm``): the one other child with a ``[hidden]`` weight and epsilon
    ``config.rms_norm_eps``, such that the block's output is that norm of the block's output with the
    norm replaced by an identity."""
    others = [(n, c) for n, c in block.named_children() if n not in _known_children(router, shared)]
    if len(others) != 1:
        return None
    name, norm = others[0]
    weight = getattr(norm, "weight", None)
    eps = next(
        (getattr(norm, a) for a in ("variance_epsilon", "eps") if isinstance(getattr(norm, a, None), float)),
        None,
    )
    if not (
        isinstance(weight, torch.Tensor)
        and weight.shape == (config.hidden_size,)
        and eps is not None
        and eps == getattr(config, "rms_norm_eps", None)
        and not list(norm.children())
    ):
        return None
    x = torch.randn(2, 5, config.hidden_size, generator=torch.Generator().manual_seed(0))
    saved_weight = weight.detach().clone()
    weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    try:
        out = block(x)
        setattr(block, name, nn.Identity())
        try:
            raw = block(x)
        finally:
            setattr(block, name, norm)
        follows = torch.allclose(out, norm(raw), rtol=1e-5, atol=1e-6)
    finally:
        weight.copy_(saved_weight)
    return (name, type(norm).__name__) if follows else None


def _check_block_state(
    block: nn.Module,
    path: str,
    router: RouterSpec,
    shared: SharedExpertSpec | None,
    post_norm: tuple[str, str] | None = None,
) -> None:
    """The MoE block holds nothing the generated block lacks: router, experts, shared expert (and its
    gate), and the block-level correction bias its router reads; any other submodule, parameter or
    buffer (A.X-K1's ``post_mlp_layernorm``) is refused by name."""
    known = _known_children(router, shared) | ({post_norm[0]} if post_norm else set())
    for name, child in block.named_children():
        if name not in known and not isinstance(child, nn.Identity):  # an Identity does nothing: left out
            raise UnsupportedFeature(
                f"{path}.{name}", f"MoE block submodule {type(child).__name__} that the generated block lacks"
            )
    own = [n for n, _ in block.named_parameters(recurse=False)] + [
        n for n, _ in block.named_buffers(recurse=False)
    ]
    allowed = {router.correction_name} if router.correction_bias == "block" else set()
    for name in own:
        if name not in allowed:
            raise UnsupportedFeature(f"{path}.{name}", "MoE block tensor that the generated block lacks")


def _dense_class(
    config: PretrainedConfig, layers: nn.ModuleList, attr: str, moe_layers: tuple[int, ...], condition: str
) -> tuple[str | None, str | None, str, tuple[float, float] | None]:
    """(class, width expression, bias expression, clamped-SwiGLU (alpha, limit) or None) of the dense
    layers' MLP, verified to be a plain gated MLP or a fused clamped SwiGLU; (None, None, "False", None)
    when every layer is MoE. The width expression is None for
    ``config.intermediate_size``.

    Taken from a dense layer of the tiny model, else from one decoder layer built alone from a copy
    of the config that makes layer 0 dense (``first_k_dense_replace=1`` / ``mlp_only_layers=[0]`` /
    a per-layer list field set to a value the condition names), so the dense MLP is measured even
    when the default config has none (Qwen-MoE, Cohere2-MoE).
    """
    if condition == "True":
        return None, None, "False", None
    index = next((i for i in range(len(layers)) if i not in moe_layers), 0)
    dense = next((layer for i, layer in enumerate(layers) if i not in moe_layers), None)
    probe = config
    dense_class, dense_index = (type(dense), index) if dense is not None else (type(layers[0]), 0)
    if dense is None:
        probe = _dense_probe_config(config, condition, len(layers))
        if probe is None:
            raise UnsupportedFeature(
                f"model.layers.0.{attr}", f"no config makes layer 0 dense under `{condition}`"
            )
        dense = _build_layer(type(layers[0]), probe)
    mlp = getattr(dense, attr)
    width = _mlp_width(mlp)
    clamp = _check_gated_mlp(config, mlp, f"model.layers.{index}.{attr} (dense layer)", width)
    rebuilt_any = False
    for name in _int_fields(probe, ("intermediate_size",)):
        if getattr(probe, name) != width:
            continue
        doubled = copy.deepcopy(probe)
        setattr(doubled, name, 2 * width)
        try:
            # the dense layer's own class and index (Jamba's layer 0 is MoE, its layer 1 dense)
            rebuilt = _mlp_width(getattr(_build_layer(dense_class, doubled, dense_index), attr))
        except Exception:  # noqa: BLE001 - a field the layer cannot be built with is not the width
            continue
        rebuilt_any = True
        if rebuilt == 2 * width:
            bias = _mlp_bias_expression(config, mlp)
            return type(mlp).__name__, None if name == "intermediate_size" else f"config.{name}", bias, clamp
    if not rebuilt_any and width == config.intermediate_size:
        return type(mlp).__name__, None, _mlp_bias_expression(config, mlp), clamp
    raise UnsupportedFeature(
        f"model.layers.{index}.{attr} (dense layer)", f"dense MLP width {width} follows no config field"
    )


def _build_layer(layer_class: type, config: PretrainedConfig, layer_idx: int = 0) -> nn.Module:
    torch.manual_seed(0)
    layer = layer_class(config, layer_idx)
    for param in layer.parameters():
        nn.init.normal_(param, std=0.1)
    return layer


def _dense_probe_config(config: PretrainedConfig, condition: str, num_layers: int) -> PretrainedConfig | None:
    """A copy of ``config`` under which ``condition`` is false for layer 0, or None."""
    probe = copy.deepcopy(config)
    if "first_k_dense_replace" in condition:
        probe.first_k_dense_replace = 1
        return probe
    if "mlp_only_layers" in condition:
        probe.mlp_only_layers = [0]
        return probe
    listed = re.fullmatch(r"layer_idx in config\.(\w+)", condition)
    if listed and isinstance(getattr(config, listed[1], None), list):  # Llama 4's moe_layers
        try:
            setattr(probe, listed[1], [i for i in getattr(config, listed[1]) if i != 0])
        except Exception:  # noqa: BLE001 - a config that refuses the list has no dense layer 0 this way
            return None
        return probe
    constants = [n.value for n in ast.walk(ast.parse(condition, mode="eval")) if isinstance(n, ast.Constant)]
    constants.append("not-a-layer-kind")  # `kinds[i] == "sparse"`: any other value is the dense branch
    for name, value in vars(config).items():
        if not (isinstance(value, list) and len(value) == num_layers):
            continue
        for constant in constants:
            probe = copy.deepcopy(config)
            try:
                setattr(probe, name, [constant, *value[1:]])
            except Exception:  # noqa: BLE001 - a typed list field (ints) refuses a kind name
                continue
            if predict_layers(probe, condition, 1) == ():
                return probe
    return None


def _mlp_bias_expression(config: PretrainedConfig, mlp: nn.Module) -> str:
    """``False``, or ``config.<flag>`` where flipping a bool ``*bias*`` config field gives the rebuilt
    MLP class biases (ERNIE-4.5's ``use_bias``); the tiny config's MLP has none (checked before)."""
    for name, value in sorted(vars(config).items()):
        if not isinstance(value, bool) or "bias" not in name:
            continue
        flipped = copy.deepcopy(config)
        setattr(flipped, name, not value)
        try:
            rebuilt = type(mlp)(flipped)
        except Exception:  # noqa: BLE001 - a flip the MLP class cannot be built with tells nothing
            continue
        linear = getattr(
            rebuilt, "gate_proj", getattr(rebuilt, "gate_up_proj", getattr(rebuilt, "up_proj", None))
        )
        if getattr(linear, "bias", None) is not None:
            return f"not config.{name}" if value else f"config.{name}"
    return "False"


def _mlp_width(mlp: nn.Module) -> int:
    """The inner width of a gated MLP: ``gate_proj``'s outputs, or half of a fused ``gate_up_proj``'s."""
    gate, fused = getattr(mlp, "gate_proj", None), getattr(mlp, "gate_up_proj", None)
    if isinstance(gate, nn.Linear):
        return gate.out_features
    if fused is None and _plain_mlp_act(mlp) is not None:  # NemotronH's down(act(up(x)))
        return mlp.up_proj.out_features
    return fused.out_features // 2 if isinstance(fused, nn.Linear) else 0


def _plain_mlp_act(mlp: nn.Module) -> str | None:
    """The measured activation of a non-gated ``down_proj(act_fn(up_proj(x)))`` MLP, else None."""
    children = dict(mlp.named_children())
    up, down = children.get("up_proj"), children.get("down_proj")
    if set(children) != {"up_proj", "down_proj", "act_fn"} or not all(
        isinstance(linear, nn.Linear) for linear in (up, down)
    ):
        return None
    try:
        activation = _measured_activation(children["act_fn"], "")
    except UnsupportedFeature:
        return None
    x = torch.randn(3, up.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = torch.allclose(mlp(x), down(ACT2FN[activation](up(x))), rtol=1e-5, atol=1e-6)
    return activation if same else None


def _activation_field(config: PretrainedConfig, activation: str) -> str:
    """``config.<field>`` naming ``activation`` (NemotronH's ``mlp_hidden_act``), else the literal."""
    fields = sorted(
        name
        for name, value in vars(config).items()
        if isinstance(value, str) and "act" in name and value in ACT2FN and value == activation
    )
    return f"config.{fields[0]}" if fields else repr(activation)


def _clamp_params(module: nn.Module) -> tuple[float, float] | None:
    """(alpha, limit) of a clamped SwiGLU module (``swiglu_alpha``/``alpha``, ``swiglu_limit``/``limit``)."""
    alpha = getattr(module, "swiglu_alpha", getattr(module, "alpha", None))
    limit = getattr(module, "swiglu_limit", getattr(module, "limit", None))
    if isinstance(alpha, (int, float)) and isinstance(limit, (int, float)):
        return float(alpha), float(limit)
    return None


@torch.no_grad()
def _fused_clamped_swiglu(mlp: nn.Module, hidden: int, width: int) -> tuple[float, float] | None:
    """(alpha, limit) when ``mlp`` is MiniMax-M3's fused MLP: ``gate_up_proj`` (gate and up halves),
    ``down_proj``, no biases, ``down((up.clamp(-limit, limit) + 1) * g * sigmoid(alpha * g))`` with
    ``g = gate.clamp(max=limit)``; else None."""
    children = dict(mlp.named_children())
    params = _clamp_params(mlp)
    fused, down = children.get("gate_up_proj"), children.get("down_proj")
    if (
        set(children) != {"gate_up_proj", "down_proj"}
        or params is None
        or not all(isinstance(linear, nn.Linear) and linear.bias is None for linear in (fused, down))
        or fused.out_features != 2 * width
    ):
        return None
    alpha, limit = params
    x = 4 * torch.randn(5, hidden, generator=torch.Generator().manual_seed(0))  # some values clamped
    gate, up = fused(x).chunk(2, dim=-1)
    gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    expected = down((up + 1) * gate * torch.sigmoid(gate * alpha))
    return params if torch.allclose(mlp(x), expected, rtol=1e-5, atol=1e-6) else None


@torch.no_grad()
def _check_gated_mlp(
    config: PretrainedConfig, mlp: nn.Module, where: str, width: int
) -> tuple[float, float] | None:
    """``mlp`` is ``down(act(gate(x)) * up(x))`` without biases, act ``config.hidden_act``, of ``width``
    (None), or a fused clamped SwiGLU of that width (MiniMax-M3's: its (alpha, limit))."""
    fused = _fused_clamped_swiglu(mlp, config.hidden_size, width)
    if fused is not None:
        return fused
    children = dict(mlp.named_children())
    linears = [children.get(name) for name in ("gate_proj", "up_proj", "down_proj")]
    others = [name for name in children if name not in ("gate_proj", "up_proj", "down_proj")]
    act = children.get(others[0]) if len(others) == 1 else None  # act_fn (Llama 4: activation_fn)
    plain = (
        len(children) == 4
        and all(isinstance(linear, nn.Linear) and linear.bias is None for linear in linears)
        and type(act) is type(ACT2FN[config.hidden_act])
        and linears[0].out_features == width
    )
    if plain:
        gate, up, down = linears
        x = torch.randn(3, config.hidden_size, generator=torch.Generator().manual_seed(0))
        plain = torch.allclose(mlp(x), down(act(gate(x)) * up(x)), rtol=1e-5, atol=1e-6)
    if not plain:
        raise UnsupportedFeature(
            where,
            f"{type(mlp).__name__} (children {', '.join(children) or 'none'}) is not a plain gated MLP "
            f"(gate_proj, up_proj, down_proj without biases, act_fn = config.hidden_act) of width {width}",
        )
    return None


def _checkpoint_aliases(config: PretrainedConfig, attr: str, key: str) -> tuple[str, ...]:
    """Names that checkpoints on disk give the packed tensor ``<attr>.<key>``, relative to the block.

    Read from transformers' own load-time renames (``conversion_mapping``): a real Aria checkpoint
    stores ``mlp.experts.fc1.weight`` where the module holds ``mlp.experts.gate_up_proj``. Only
    plain renames of that exact key are taken (escaped dots, no other pattern).
    """
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # a release without load-time renames
        return ()
    aliases = []
    for rename in get_checkpoint_conversion_mapping(config.model_type) or ():
        if type(rename).__name__ != "WeightRenaming":
            continue
        for source, target in zip(rename.source_patterns, rename.target_patterns, strict=False):
            source = source.replace("\\.", ".")
            if target.lstrip(".") != f"{attr}.{key}" or re.search(r"[\\^$*+?()\[\]{}|]", source):
                continue
            if source.lstrip(".").startswith(f"{attr}."):
                aliases.append(source.lstrip(".").removeprefix(f"{attr}."))
    return tuple(aliases)


def _analyze_experts(config: PretrainedConfig, block: nn.Module, path: str, attr: str) -> ExpertsSpec:
    experts = block.experts
    if isinstance(experts, nn.ModuleList):
        raise UnsupportedFeature(
            path, "per-expert modules in the HF model", "expected transformers 5 fused experts"
        )
    params = dict(experts.named_parameters(recurse=False))
    if (
        "gate_up_proj" not in params
        and set(params) == {"up_proj", "down_proj"}
        and not any(True for child in experts.children() for _ in child.parameters())
    ):
        return _non_gated_experts(config, block, experts, path, attr)
    if "gate_up_proj" not in params and {"up_proj", "down_proj"} <= set(params):
        inner = [
            f"{name} ({type(child).__name__})"
            for name, child in experts.named_children()
            if any(True for _ in child.parameters())  # a per-expert norm, not the activation
        ]
        raise UnsupportedFeature(
            path,
            f"non-gated experts (packed {', '.join(sorted(params))}: down(act(up(x))))"
            + (f" with {', '.join(inner)} inside" if inner else ""),
            "the MoE templates run packed experts through torch_moe, which has no module inside an expert",
        )
    if not {"gate_up_proj", "down_proj"} <= set(params) or set(params) - set(_PACKED_KEYS):
        raise UnsupportedFeature(
            path, f"expert tensors {sorted(params)}", "expected gated experts: gate_up_proj and down_proj"
        )
    has_bias = "gate_up_proj_bias" in params
    if has_bias != ("down_proj_bias" in params):
        raise UnsupportedFeature(path, "a bias on only one of gate_up_proj and down_proj")
    alpha_expr = limit_expr = None
    alpha = getattr(experts, "alpha", getattr(experts, "swiglu_alpha", None))
    if hasattr(experts, "limit") and alpha is not None:
        activation = "clamped_swiglu"
        alpha_expr = _field_or_literal(config, "swiglu_alpha", float(alpha), path)
        limit_expr = _field_or_literal(config, "swiglu_limit", float(experts.limit), path)
    else:
        activation = _activation_name(config, experts, path)
        if has_bias:
            raise UnsupportedFeature(
                path, "expert biases with a torch_moe activation", "torch_moe has no biases"
            )
    concatenated, transposed = _probe_packing(experts, _glu(config, experts, activation), path)
    gate_up = params["gate_up_proj"]
    num_experts, inner = gate_up.shape[0], (gate_up.shape[2] if transposed else gate_up.shape[1]) // 2
    packed = PackedExperts(
        gate_up_key="gate_up_proj",
        down_key="down_proj",
        concatenated=concatenated,
        transposed=transposed,
        gate_up_bias_key="gate_up_proj_bias" if has_bias else None,
        down_bias_key="down_proj_bias" if has_bias else None,
        gate_up_aliases=_checkpoint_aliases(config, attr, "experts.gate_up_proj"),
        down_aliases=_checkpoint_aliases(config, attr, "experts.down_proj"),
    )
    return ExpertsSpec(
        num_experts=num_experts,
        num_experts_field=_measured_expression(
            config,
            block,
            [
                (f"config.{name}", name)
                for name in _int_fields(config, _EXPERT_COUNT_FIELDS)
                if getattr(config, name) == num_experts
            ],
            _EXPERT_COUNT_FIELDS,
            lambda rebuilt: rebuilt.experts.gate_up_proj.shape[0],
            path,
            "number of experts",
            num_experts,
        ).removeprefix("config."),
        intermediate_size=inner,
        intermediate_field=_field_with_value(config, _EXPERT_WIDTH_FIELDS, inner, path, "expert width"),
        activation=activation,
        has_bias=has_bias,
        packed=packed,
        swiglu_alpha_expr=alpha_expr,
        swiglu_limit_expr=limit_expr,
    )


def _measured_activation(act: Any, path: str) -> str:
    """The ``MOE_ACTIVATIONS`` name whose function ``act`` computes (a module or a plain function)."""
    x = torch.linspace(-6.0, 6.0, 101)
    with torch.no_grad():
        found = [
            n for n in MOE_ACTIVATIONS if callable(act) and torch.allclose(act(x), ACT2FN[n](x), atol=1e-6)
        ]
    if not found:
        raise UnsupportedFeature(
            path,
            f"expert activation {type(act).__name__}",
            f"torch_moe runs {', '.join(sorted(MOE_ACTIVATIONS))}",
        )
    return found[0]


def _non_gated_experts(
    config: PretrainedConfig, block: nn.Module, experts: nn.Module, path: str, attr: str
) -> ExpertsSpec:
    """Packed non-gated experts ``down(act(up(x)))`` (NemotronH): ``up_proj [E, I, H]`` (or transposed
    ``[E, H, I]``) and ``down_proj [E, H, I]`` (``[E, I, H]``); the layout and the activation are
    measured on tokens sent to expert 1 with weight 1."""
    activation = _measured_activation(getattr(experts, "act_fn", None), path)
    act = ACT2FN[activation]
    probed = min(1, experts.up_proj.shape[0] - 1)
    up, down = experts.up_proj[probed].float(), experts.down_proj[probed].float()
    layout = None
    for transposed in (False, True):
        weight, down_weight = (up.T, down.T) if transposed else (up, down)
        if down_weight.shape != (weight.shape[1], weight.shape[0]):
            continue
        tokens = torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = experts(
                tokens.to(experts.up_proj.dtype),
                torch.full((5, 1), probed, dtype=torch.long),
                torch.ones(5, 1, dtype=experts.up_proj.dtype),
            ).float()
            out = act(tokens @ weight.T) @ down_weight.T
        if torch.allclose(out, expected, rtol=1e-4, atol=1e-5):
            layout = transposed
            break
    if layout is None:
        raise UnsupportedFeature(path, "non-gated expert tensors in no known layout (down(act(up(x))))")
    num_experts = experts.up_proj.shape[0]
    inner = experts.up_proj.shape[2] if layout else experts.up_proj.shape[1]
    packed = PackedExperts(
        gate_up_key="up_proj",
        down_key="down_proj",
        concatenated=False,
        transposed=layout,
        gate_up_bias_key=None,
        down_bias_key=None,
        gate_up_aliases=_checkpoint_aliases(config, attr, "experts.up_proj"),
        down_aliases=_checkpoint_aliases(config, attr, "experts.down_proj"),
    )
    return ExpertsSpec(
        num_experts=num_experts,
        num_experts_field=_measured_expression(
            config,
            block,
            [
                (f"config.{name}", name)
                for name in _int_fields(config, _EXPERT_COUNT_FIELDS)
                if getattr(config, name) == num_experts
            ],
            _EXPERT_COUNT_FIELDS,
            lambda rebuilt: rebuilt.experts.up_proj.shape[0],
            path,
            "number of experts",
            num_experts,
        ).removeprefix("config."),
        intermediate_size=inner,
        intermediate_field=_field_with_value(config, _EXPERT_WIDTH_FIELDS, inner, path, "expert width"),
        activation=activation,
        has_bias=False,
        packed=packed,
        gated=False,
    )


def _glu(
    config: PretrainedConfig, experts: nn.Module, activation: str
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The expert's ``(gate, up) -> inner`` function for ``activation``, in plain torch."""
    if activation != "clamped_swiglu":
        act = ACT2FN[activation]  # the measured activation (config.hidden_act where it names it)
        return lambda gate, up: act(gate) * up
    alpha, limit = getattr(experts, "alpha", getattr(experts, "swiglu_alpha", None)), experts.limit

    def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
        return (up + 1) * gate * torch.sigmoid(gate * alpha)

    return clamped_swiglu


@torch.no_grad()
def _probe_packing(
    experts: nn.Module, glu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], path: str
) -> tuple[bool, bool]:
    """(concatenated, transposed): the packing that reproduces HF's output for tokens sent to one expert.

    gate_up is ``[E, 2I, H]`` or transposed ``[E, H, 2I]``, gate and up its halves (concatenated) or
    alternate rows; down is ``[E, H, I]`` or ``[E, I, H]``. Expert 1 (not 0) with weight 1 is probed.
    """
    probed = min(1, experts.gate_up_proj.shape[0] - 1)
    gate_up, down = experts.gate_up_proj[probed].float(), experts.down_proj[probed].float()
    gate_up_bias = getattr(experts, "gate_up_proj_bias", None)
    down_bias = getattr(experts, "down_proj_bias", None)
    for transposed in (False, True):
        weight, down_weight = (gate_up.T, down.T) if transposed else (gate_up, down)
        hidden = weight.shape[1]
        if down_weight.shape != (hidden, weight.shape[0] // 2):
            continue
        tokens = torch.randn(5, hidden, generator=torch.Generator().manual_seed(0))
        expected = _expert_output(experts, tokens.to(gate_up.dtype), probed).float()
        projected = tokens @ weight.T + (0 if gate_up_bias is None else gate_up_bias[probed].float())
        for concatenated in (True, False):
            gate, up = projected.chunk(2, dim=-1) if concatenated else (projected[:, ::2], projected[:, 1::2])
            out = glu(gate, up) @ down_weight.T + (0 if down_bias is None else down_bias[probed].float())
            if torch.allclose(out, expected, rtol=1e-4, atol=1e-5):
                return concatenated, transposed
    raise UnsupportedFeature(path, "packed expert tensors in no known layout (gate/up halves or interleaved)")


def takes_routing(experts: nn.Module) -> bool:
    """Whether the packed experts take ``(hidden, ids, weights)`` (transformers 5) or only the tokens,
    every expert on its own copy of them (Llama 4's ``[E * T, H]``, the routing applied before)."""
    return len(inspect.signature(experts.forward).parameters) > 1


def _expert_output(experts: nn.Module, tokens: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert ``expert``'s output for ``tokens`` ``[T, H]`` with routing weight 1."""
    if takes_routing(experts):
        count = len(tokens)
        return experts(
            tokens,
            torch.full((count, 1), expert, dtype=torch.long),
            torch.ones(count, 1, dtype=experts.gate_up_proj.dtype),
        )
    num_experts = experts.gate_up_proj.shape[0]
    out = experts(tokens.repeat(num_experts, 1))  # expert e reads rows e*T .. (e+1)*T
    return out.reshape(num_experts, len(tokens), -1)[expert]


def _activation_name(config: PretrainedConfig, experts: nn.Module, path: str) -> str:
    """``config.hidden_act`` when it is the experts' activation and torch_moe can run it."""
    name = getattr(config, "hidden_act", None)
    act = getattr(experts, "act_fn", None)
    if act is not None and not isinstance(act, nn.Module) and callable(act):
        # a plain function (LFM2-MoE's ``self.act_fn = F.silu``): the activation it computes
        x = torch.linspace(-6.0, 6.0, 101)
        measured = [n for n in MOE_ACTIVATIONS if torch.allclose(act(x), ACT2FN[n](x), atol=1e-6)]
        if measured:
            return measured[0]
    if name is None or act is None or type(act) is not type(ACT2FN[name]):
        raise UnsupportedFeature(path, f"expert activation {type(act).__name__} is not config.hidden_act")
    if name not in MOE_ACTIVATIONS:
        raise UnsupportedFeature(
            path, f"expert activation {name!r}", f"torch_moe runs {', '.join(sorted(MOE_ACTIVATIONS))}"
        )
    return name


def _inner_linear(router: nn.Module) -> str | None:
    """The name of the one ``nn.Linear`` child without bias a router keeps its weight in (AFMoE's
    ``router.gate``, HunYuan-MoE's ``gate.wg``), when that child is all the router holds besides a
    correction-bias holder; else None."""
    own = [n for n, _ in router.named_parameters(recurse=False)] + [
        n for n, _ in router.named_buffers(recurse=False)
    ]
    linears = [n for n, c in router.named_children() if isinstance(c, nn.Linear)]
    if "weight" in own or len(linears) != 1:
        return None
    linear = getattr(router, linears[0])
    return linears[0] if linear.bias is None else None


def router_weight(router: nn.Module) -> torch.Tensor:
    """The router's ``[E, H]`` weight: its own, or that of the linear it holds (:func:`_inner_linear`)."""
    inner = _inner_linear(router)
    return getattr(router, inner).weight if inner is not None else router.weight


def _router_module(block: nn.Module, path: str) -> tuple[str, nn.Module]:
    for attr in _ROUTER_ATTRS:
        module = getattr(block, attr, None)
        if isinstance(module, nn.Module) and isinstance(getattr(module, "weight", None), torch.Tensor):
            return attr, module
    for attr in _ROUTER_ATTRS:  # a router module that keeps its linear inside (AFMoE's router.gate)
        module = getattr(block, attr, None)
        if isinstance(module, nn.Module) and _inner_linear(module) is not None:
            return attr, module
    for attr in _ROUTER_ATTRS:
        module = getattr(block, attr, None)
        if isinstance(module, nn.Module) and list(module.children()):
            inner = sorted(dict(module.named_children()))
            raise UnsupportedFeature(
                f"{path}.{attr}",
                f"router {type(module).__name__} holding submodules {inner}; the router templates take"
                " a `gate`/`router` module with its own weight or one bias-free linear",
            )
    found = next((a for a in _ROUTER_ATTRS if isinstance(getattr(block, a, None), nn.Module)), None)
    if found is not None:
        inner = [name for name, _ in getattr(block, found).named_parameters()]
        raise UnsupportedFeature(
            f"{path}.{found}",
            f"router {type(getattr(block, found)).__name__} keeps its weight as {inner}, not `{found}.weight`",
        )
    raise UnsupportedFeature(path, "no router (`gate` or `router` with a weight)")


_SCALING_FIELDS = ("routed_scaling_factor", "router_scaling_factor")
_CORRECTION = "e_score_correction_bias"


def _router_correction(router: nn.Module) -> tuple[str | None, torch.Tensor] | None:
    """(statics submodule name or None, tensor) of the router's score-correction bias: its own
    ``e_score_correction_bias``, or that of a submodule holding nothing else (ERNIE's ``moe_statics``)."""
    own = getattr(router, _CORRECTION, None)
    if isinstance(own, torch.Tensor):
        return None, own
    for name, child in router.named_children():
        tensors = dict(child.named_parameters()) | dict(child.named_buffers())
        if set(tensors) == {_CORRECTION} and not list(child.children()):
            return name, tensors[_CORRECTION]
    return None


def block_correction(block: nn.Module, num_experts: int) -> tuple[str, torch.Tensor] | None:
    """(name, tensor) of a score-correction bias the MoE block holds for its router: its
    ``e_score_correction_bias``, else its one own ``[E]`` tensor (AFMoE's ``expert_bias``)."""
    own = dict(block.named_parameters(recurse=False)) | dict(block.named_buffers(recurse=False))
    if isinstance(own.get(_CORRECTION), torch.Tensor):
        return _CORRECTION, own[_CORRECTION]
    vectors = [(n, t) for n, t in own.items() if t.shape == (num_experts,) and t.is_floating_point()]
    return vectors[0] if len(vectors) == 1 else None


def _correction_owner(block: nn.Module, router: nn.Module, where: str) -> tuple[str | None, str]:
    """Where the score-correction bias lives: on the router (DeepSeek), on the block and handed to the
    router's forward (MiniMax-M2's ``e_score_correction_bias``, AFMoE's ``expert_bias``), or nowhere;
    and its name."""
    on_router = _router_correction(router) is not None
    on_block = block_correction(block, router_weight(router).shape[0])
    params = [
        p
        for p in inspect.signature(router.forward).parameters.values()
        if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    takes = [
        p for p in inspect.signature(router.forward).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    if on_block is not None and not on_router and (len(params) == 2 or len(takes) == 2):
        return "block", on_block[0]  # LFM2-MoE's ``forward(hidden_states, expert_bias=None)`` too
    if len(params) != 1:
        raise UnsupportedFeature(
            where, f"router forward takes {[p.name for p in params]}, not (hidden_states)"
        )
    return ("router" if on_router else None), _CORRECTION


def _router_of(block: nn.Module, router: RouterSpec) -> nn.Module:
    """The block's router as the probes call it (:func:`routing_view`)."""
    return routing_view(block, router.attr, router.class_name)


def _analyze_router(config: PretrainedConfig, block: nn.Module, path: str) -> RouterSpec:
    attr, _ = _router_module(block, path)
    router = routing_view(block, attr, f"{model_prefix(config)}TopKRouter")
    weight = router_weight(router)
    saved = weight.detach().clone()
    if bool((saved == saved.flatten()[0]).all()):  # zero-initialised (AFMoE): every expert would tie
        with torch.no_grad():
            weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)))
    try:
        return _measure_router(config, block, path, attr, router)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def _measure_router(
    config: PretrainedConfig, block: nn.Module, path: str, attr: str, router: nn.Module
) -> RouterSpec:
    where = f"{path}.{attr}"
    class_name = router.lean_class if isinstance(router, BlockRouting) else type(router).__name__
    extras = {name for name, _ in router.named_parameters(recurse=False)} | {
        name for name, _ in router.named_buffers(recurse=False)
    }
    unknown = extras - {"weight", "bias", _CORRECTION}
    statics = _router_correction(router)
    statics_attr = statics[0] if statics is not None else None
    linear_attr = _inner_linear(router)
    children = [name for name, _ in router.named_children() if name not in (statics_attr, linear_attr)]
    if unknown or children:
        raise UnsupportedFeature(where, f"router state {sorted(unknown) or children}")
    if not isinstance(getattr(router, "top_k", None), int):
        raise UnsupportedFeature(where, f"router {type(router).__name__} without an integer top_k")
    top_k_field = _field_with_value(config, _TOP_K_FIELDS, router.top_k, where, "router top-k")
    owner, correction_name = _correction_owner(block, router, where)
    block_bias = getattr(block, correction_name) if owner == "block" else None
    grouped = hasattr(router, "num_group") and hasattr(router, "topk_group")
    try:
        scoring, norm, scale, choice_on = _probe_router(router, where, block_bias, grouped)
    except UnsupportedFeature:
        jitter_field = None if owner or grouped else _sparsemixer_field(config, router, where)
        if jitter_field is None:
            raise
        return RouterSpec(
            attr=attr,
            class_name=class_name,
            scoring="sparsemixer",
            top_k_field=top_k_field,
            norm_topk_prob=False,
            norm_field=None,
            has_bias="bias" in extras,
            has_correction_bias=False,
            grouped=False,
            scaling_field=None,
            correction_bias=None,
            linear_attr=linear_attr,
            jitter_field=jitter_field,
        )
    norm_field = "norm_topk_prob" if getattr(config, "norm_topk_prob", None) is not None else None
    if norm_field is not None and not _follows_flag(
        config, router, norm_field, norm, where, block_bias, grouped
    ):
        norm_field = None  # the flag does not change this router (Cohere2-MoE's softmax over the top-k)
    if norm_field is not None and bool(config.norm_topk_prob) != norm:
        raise UnsupportedFeature(where, "router normalisation does not follow config.norm_topk_prob")
    scaling_field = None
    named = next((f for f in _SCALING_FIELDS if isinstance(getattr(router, f, None), (int, float))), None)
    if named is not None:
        scaling_field = _field_with_value(config, (named,), getattr(router, named), where, "routed scaling")
        if not math.isclose(float(getattr(router, named)), scale, rel_tol=1e-4):
            raise UnsupportedFeature(where, f"routing weights scaled by {scale:.6g}, not by config.{named}")
    else:
        scaling_field = _scaling_field(config, router, scale, where, block_bias, grouped)
    if grouped:
        _field_with_value(config, ("n_group",), router.num_group, where, "expert groups")
        _field_with_value(config, ("topk_group",), router.topk_group, where, "selected groups")
        if not (scoring == "sigmoid" and owner == "router") and not (
            scoring == "softmax" and not _picks_other_experts(router)
        ):
            raise UnsupportedFeature(
                where,
                "grouped top-k other than over bias-corrected sigmoid scores (a softmax router whose"
                " group limit drops experts)",
            )
    statics_class = None
    if statics_attr is not None:
        statics_class = type(getattr(router, statics_attr)).__name__
        if statics[1].shape not in ((len(router_weight(router)),), (1, len(router_weight(router)))):
            raise UnsupportedFeature(
                f"{where}.{statics_attr}", f"correction bias of shape {list(statics[1].shape)}"
            )
    return RouterSpec(
        attr=attr,
        class_name=class_name,
        scoring=scoring,
        top_k_field=top_k_field,
        norm_topk_prob=norm,
        norm_field=norm_field,
        has_bias="bias" in extras,
        has_correction_bias=owner is not None,
        grouped=grouped,
        scaling_field=scaling_field,
        correction_bias=owner,
        correction_name=correction_name,
        linear_attr=linear_attr,
        choice_on=choice_on,
        statics_attr=statics_attr,
        statics_class=statics_class,
        statics_shape=tuple(statics[1].shape[:-1]) if statics_attr is not None else (),
        logit_softcap_field=_router_softcap_field(config, router) if scoring == "sigmoid" else None,
    )


@torch.no_grad()
def _router_softcap_field(config: PretrainedConfig, router: nn.Module) -> str | None:
    """The float config field (off at 0 or below) of a tanh soft-cap on the router logits: the router
    rebuilt from a config with that field at 2.0 returns ``2 tanh(x W^T / 2)`` as its logits where the
    field off returns ``x W^T`` (Laguna's ``moe_router_logit_softcapping``); None when no field does."""
    weight = router_weight(router)
    tokens = torch.randn(_PROBE_TOKENS, weight.shape[1], generator=torch.Generator().manual_seed(7))
    raw = torch.nn.functional.linear(tokens, weight.float()).float()
    for name, value in sorted(vars(config).items()):
        if not isinstance(value, float) or value > 0:
            continue
        probe = copy.deepcopy(config)
        setattr(probe, name, 2.0)
        try:
            plain = _call_router(router, tokens.to(weight.dtype))[0].float()
            capped = _call_router(_rebuilt_router(router, probe), tokens.to(weight.dtype))[0].float()
        except Exception:  # noqa: BLE001 - a value the router cannot be built or run with is no cap
            continue
        plain, capped = plain.reshape(raw.shape), capped.reshape(raw.shape)
        if torch.allclose(plain, raw, rtol=1e-4, atol=1e-5) and torch.allclose(
            capped, 2.0 * torch.tanh(raw / 2.0), rtol=1e-4, atol=1e-5
        ):
            return name
    return None


def _follows_flag(
    config: PretrainedConfig,
    router: nn.Module,
    flag: str,
    normalised: bool,
    where: str,
    block_bias: torch.Tensor | None,
    grouped: bool,
) -> bool:
    """Whether the router's renormalisation changes with ``config.<flag>``: the router rebuilt from a
    config with the flag flipped (same weights) is probed again. True when it cannot be rebuilt."""
    probe = copy.deepcopy(config)
    setattr(probe, flag, not getattr(config, flag))
    try:
        flipped = _rebuilt_router(router, probe)
    except Exception:  # noqa: BLE001 - a router that cannot be rebuilt alone keeps the config's flag
        return True
    return _probe_router(flipped, where, block_bias, grouped)[1] != normalised


def _rebuilt_router(router: nn.Module, config: PretrainedConfig) -> nn.Module:
    """``router``'s class built from ``config``, holding ``router``'s weights."""
    rebuilt = (
        router.rebuilt(router.block_type(config))
        if isinstance(router, BlockRouting)
        else type(router)(config)
    )
    rebuilt.load_state_dict(router.state_dict())
    return rebuilt.to(router_weight(router).dtype)


def _scaling_field(
    config: PretrainedConfig,
    router: nn.Module,
    scale: float,
    where: str,
    block_bias: torch.Tensor | None,
    grouped: bool,
) -> str | None:
    """The float config field the routing weights are scaled by (AFMoE's ``route_scale``), found by
    rebuilding the router with each float field of the measured ``scale`` set to another value; None
    when the weights are not scaled and no field changes that."""
    for name, value in sorted(vars(config).items()):
        if not isinstance(value, float) or not math.isclose(value, scale, rel_tol=1e-4):
            continue
        probe = copy.deepcopy(config)
        setattr(probe, name, 2.5 * value + 0.5)
        try:
            rescaled = _probe_router(_rebuilt_router(router, probe), where, block_bias, grouped)[2]
        except Exception:  # noqa: BLE001 - a value the router cannot be built or run with is not the scale
            continue
        if math.isclose(rescaled, 2.5 * value + 0.5, rel_tol=1e-4):
            return name
    if not math.isclose(scale, 1.0, rel_tol=1e-4):
        raise UnsupportedFeature(where, f"routing weights scaled by {scale:.6g}, no config field")
    return None


def sparsemixer(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) ``[T, 2]`` of PhiMoE's sparse mixer at inference: twice, the best remaining
    expert, weighted by its softmax over the experts whose logit is within ``2 * jitter_eps``
    (relative) of it."""
    scores, weights, ids = logits, [], []
    for _ in range(2):
        top, index = scores.max(dim=-1, keepdim=True)
        dropped = (top - logits) / logits.abs().clamp(min=top) > 2 * jitter_eps
        weights.append(scores.masked_fill(dropped, float("-inf")).softmax(dim=-1).gather(1, index))
        ids.append(index)
        scores = scores.scatter(1, index, float("-inf"))
    return torch.cat(weights, dim=1), torch.cat(ids, dim=1)


@torch.no_grad()
def _sparsemixer_field(config: PretrainedConfig, router: nn.Module, where: str) -> str | None:
    """The float config field a sparse-mixer router (PhiMoE's) reads its ``jitter_eps`` from, or None
    when the router is no sparse mixer: its (weights, ids) must be :func:`sparsemixer` of its logits at
    that field's value, and again with the router rebuilt from a config with the field at 0.3."""
    weight = router_weight(router)
    tokens = torch.randn(_PROBE_TOKENS, weight.shape[1], generator=torch.Generator().manual_seed(3))

    def reproduces(module: nn.Module, eps: float) -> bool:
        logits, weights, ids = _call_router(module, tokens.to(weight.dtype))
        expected_weights, expected_ids = sparsemixer(logits.float(), eps)
        return torch.equal(ids, expected_ids) and torch.allclose(
            weights.float(), expected_weights, rtol=1e-4, atol=1e-6
        )

    if router.training:
        return None
    for name, value in sorted(vars(config).items()):
        if not isinstance(value, float) or value <= 0 or not reproduces(router, value):
            continue
        probe = copy.deepcopy(config)
        setattr(probe, name, 0.3)
        try:
            if reproduces(_rebuilt_router(router, probe).eval(), 0.3):
                return name
        except Exception:  # noqa: BLE001 - a value the router cannot be built or run with is not its eps
            continue
    return None


def _same_sets(ids: torch.Tensor, choice: torch.Tensor) -> bool:
    expected = torch.topk(choice, ids.shape[1], dim=-1)[1]
    return bool((ids.sort(dim=-1)[0] == expected.sort(dim=-1)[0]).all())


def _call_router(router: nn.Module, tokens: torch.Tensor, *args: torch.Tensor) -> object:
    """The router's output for tokens ``[T, H]``, passed as ``[1, T, H]`` to a router that reads three
    dims (AFMoE's)."""
    try:
        out = router(tokens, *args)
    except ValueError:  # `_, _, hidden = hidden_states.shape`
        out = router(tokens[None], *args)
    return _logits_first(_dense_router_output(router, out))


def _logits_first(out: object) -> object:
    """A router returning ``(top-k ids, top-k weights, logits)`` (GraniteMoeHybrid's on transformers
    5.17) read in the ``(logits, top-k weights, top-k ids)`` order of later releases; any other output
    as it is."""
    if (
        isinstance(out, tuple)
        and len(out) == 3
        and all(isinstance(t, torch.Tensor) for t in out)
        and not out[0].is_floating_point()
        and out[2].is_floating_point()
    ):
        return out[2], out[1], out[0]
    return out


def _dense_router_output(router: nn.Module, out: object) -> object:
    """A router returning ``(scores [T, E], logits [T, E])`` with the scores of the unselected experts
    at zero (Llama 4's sigmoid of the top-k logits, minus infinity elsewhere) read as transformers 5's
    ``(logits, top-k weights, top-k ids)``; any other output as it is."""
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(getattr(router, "top_k", None), int)):
        return out
    scores, logits = out
    if not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in out) or scores.shape != logits.shape:
        return out
    top_k = router.top_k
    weights, ids = torch.topk(scores, top_k, dim=-1)
    if not bool((scores.scatter(1, ids, 0.0) == 0).all()):
        return out
    return logits, weights, ids


@torch.no_grad()
def _picks_other_experts(router: nn.Module) -> bool:
    """Whether the router's top-k ids differ from the plain top-k of its logits (group limits)."""
    weight = router_weight(router)
    tokens = torch.randn(_PROBE_TOKENS, weight.shape[1], generator=torch.Generator().manual_seed(1))
    logits, _, ids = _call_router(router, tokens.to(weight.dtype))
    plain = logits.float().topk(ids.shape[-1], dim=-1).indices
    return not torch.equal(plain.sort(dim=-1).values, ids.sort(dim=-1).values)


@torch.no_grad()
def _probe_router(
    router: nn.Module, where: str, block_bias: torch.Tensor | None, grouped: bool
) -> tuple[str, bool, float, str]:
    """Run the HF router on random tokens; return (scoring, normalised, scale, choice_on) that
    reproduce it.

    transformers 5 routers return ``(logits, top-k weights, top-k ids)``; the weights are matched
    against softmax / sigmoid of the logits at the chosen ids, with and without renormalisation, times
    one constant (the routed scaling). A softmax over only the top-k logits (GPT-OSS) is the
    renormalised softmax. With a score-correction bias (set at random for the probe) the ids must be
    the top-k of scores + bias (DeepSeek, MiniMax-M2) or of logits + bias (choice_on ``logits``);
    without, the top-k of the scores. Grouped top-k is not re-derived here. ``block_bias``: the MoE
    block's correction bias, handed to the router's forward.
    """
    weight = router_weight(router)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(_PROBE_TOKENS, weight.shape[1], generator=generator, dtype=torch.float32)
    found = _router_correction(router)
    correction = block_bias if block_bias is not None else (found and found[1])
    saved, bias = None, torch.zeros(())
    if isinstance(correction, torch.Tensor):
        saved, bias = correction.detach().clone(), torch.randn(correction.shape, generator=generator)
        correction.copy_(bias)
    try:
        out = _call_router(router, tokens.to(weight.dtype), *(() if block_bias is None else (block_bias,)))
    finally:
        if saved is not None:
            correction.copy_(saved)
    if not (isinstance(out, tuple) and len(out) == 3):
        raise UnsupportedFeature(where, "router does not return (logits, weights, indices)")
    logits, weights, ids = (t.float() if t.is_floating_point() else t for t in out)
    scores = {"softmax": torch.softmax(logits, dim=-1), "sigmoid": torch.sigmoid(logits)}
    for scoring, score in scores.items():
        picked = score.gather(1, ids)
        for normalised in (False, True):
            expected = picked / picked.sum(dim=-1, keepdim=True) if normalised else picked
            scale = float((weights * expected).sum() / (expected * expected).sum())
            if not torch.allclose(weights, expected * scale, rtol=1e-4, atol=1e-6):
                continue
            if grouped:
                return scoring, normalised, scale, "scores"
            for choice_on, base in (("scores", score), ("logits", logits)):
                if _same_sets(ids, base + bias):
                    return scoring, normalised, scale, choice_on
            raise UnsupportedFeature(
                where, "router picks experts on neither scores nor logits (+ correction bias)"
            )
    raise UnsupportedFeature(
        where,
        f"router {type(router).__name__}: weights match no known scoring (softmax or sigmoid top-k "
        "over the logits, times one constant)",
    )


def _analyze_shared(
    config: PretrainedConfig, block: nn.Module, path: str, experts: ExpertsSpec
) -> SharedExpertSpec | None:
    attr = next((a for a in _SHARED_ATTRS if isinstance(getattr(block, a, None), nn.Module)), None)
    if attr is None:
        attr = _unnamed_shared_mlp(config, block)
    if attr is None:
        return None
    shared = getattr(block, attr)
    where = f"{path}.{attr}"
    width = _mlp_width(shared)
    plain_act = _plain_mlp_act(shared)
    if plain_act is None:
        _check_gated_mlp(config, shared, where, width)
    inner = experts.intermediate_field
    candidates = [
        (f"config.{inner} * config.{name}", name)
        for name in _int_fields(config, _SHARED_COUNT_FIELDS)
        if getattr(config, name) * getattr(config, inner) == width
    ]
    candidates += [
        (f"config.{name}", name)
        for name in _int_fields(config, _SHARED_WIDTH_FIELDS)
        if getattr(config, name) == width
    ]
    if getattr(config, inner) == width:  # the experts' own width (HunYuan-MoE's shared_mlp)
        candidates.append((f"config.{inner}", inner))
    known = _SHARED_COUNT_FIELDS + _SHARED_WIDTH_FIELDS

    def shared_width(probe: PretrainedConfig) -> int:
        return _mlp_width(getattr(probe, attr))

    expr = _measured_expression(
        config, block, candidates, known, shared_width, where, "shared expert width", width
    )
    gate_attr = None
    gate = getattr(block, f"{attr}_gate", None)
    if gate is not None:
        if not (isinstance(gate, nn.Linear) and gate.out_features == 1 and gate.bias is None):
            raise UnsupportedFeature(f"{where}_gate", "shared expert gate other than a Linear(hidden, 1)")
        gate_attr = f"{attr}_gate"
    return SharedExpertSpec(
        attr=attr,
        class_name=type(shared).__name__,
        intermediate_expr=expr,
        gate_attr=gate_attr,
        plain_act=_activation_field(config, plain_act) if plain_act is not None else None,
    )


def _unnamed_shared_mlp(config: PretrainedConfig, block: nn.Module) -> str | None:
    """The one child of the MoE block besides its router and experts that is a plain gated MLP
    (HunYuan-MoE's ``shared_mlp``), or None."""
    found = []
    for name, child in block.named_children():
        if name in ("experts", *_ROUTER_ATTRS):
            continue
        width = _mlp_width(child)
        try:
            _check_gated_mlp(config, child, name, width)
        except UnsupportedFeature:
            continue
        found.append(name)
    return found[0] if len(found) == 1 else None


def _layer_condition(
    config: PretrainedConfig,
    moe_layers: tuple[int, ...],
    num_layers: int,
    path: str,
    layer: nn.Module | None = None,
    attr: str = "mlp",
    block_class: str = "",
) -> str:
    """A config expression true exactly on the MoE layers; checked on the measured layers.

    Tried in order: the test the HF decoder layer's ``__init__`` itself branches on to build the MoE
    block (``self.mlp = Block(config) if <test> else MLP(config)`` or an ``if <test>:`` statement) when
    it reads only ``config`` and ``layer_idx`` (ERNIE's start/end/interval, DeepSeek-V3.2's
    ``mlp_layer_types``, which a config may set apart from ``first_k_dense_replace``); then
    DeepSeek's ``first_k_dense_replace`` and Qwen-MoE's ``decoder_sparse_step`` rule; the rule
    measured; else ``True`` (every layer). The first whose prediction equals the measured layers is kept.
    """
    candidates: list[str] = []
    if layer is not None:  # the test transformers itself builds the MoE block on comes first
        source_test = _source_layer_condition(type(layer), attr, block_class)
        if source_test is not None:
            candidates.append(source_test)
    if getattr(config, "first_k_dense_replace", None) is not None:
        candidates.append("layer_idx >= config.first_k_dense_replace")
    if getattr(config, "decoder_sparse_step", None) is not None:
        count = next((f for f in _EXPERT_COUNT_FIELDS if getattr(config, f, None) is not None), None)
        if count is not None:
            candidates.append(
                f"layer_idx not in config.mlp_only_layers and config.{count} > 0 "
                "and (layer_idx + 1) % config.decoder_sparse_step == 0"
            )
    measured = _measured_layer_condition(config, moe_layers, num_layers)
    if measured is not None:
        candidates.append(measured[0])
    candidates.append("True")
    tried = []
    for condition in candidates:
        predicted = predict_layers(config, condition, num_layers)
        if predicted == moe_layers:
            return condition
        tried.append(f"`{condition}` (gives {list(predicted) if predicted is not None else 'an error'})")
    raise UnsupportedFeature(path, f"MoE layers {list(moe_layers)} follow none of {', '.join(tried)}")


def predict_layers(config: PretrainedConfig, condition: str, num_layers: int) -> tuple[int, ...] | None:
    """The layers for which ``condition`` (over ``config`` and ``layer_idx``) holds; None if it fails."""
    code = compile(condition, "<layer condition>", "eval")
    try:
        return tuple(
            i
            for i in range(num_layers)
            if eval(code, {"__builtins__": {}}, {"config": config, "layer_idx": i})
        )
    except Exception:  # noqa: BLE001 - a candidate that does not evaluate on this config is not the rule
        return None


_INVERSE_OPS: dict[type, type] = {
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Lt: ast.GtE,
    ast.GtE: ast.Lt,
    ast.Gt: ast.LtE,
    ast.LtE: ast.Gt,
}


def _negated(test: ast.expr) -> ast.expr:
    """``test`` negated: a single comparison with its inverse operator (``!=`` for ``==``), else ``not``."""
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and type(test.ops[0]) in _INVERSE_OPS:
        return ast.Compare(
            left=test.left, ops=[_INVERSE_OPS[type(test.ops[0])]()], comparators=test.comparators
        )
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return test.operand
    return ast.UnaryOp(op=ast.Not(), operand=test)


def _source_layer_condition(layer_class: type, attr: str, block_class: str) -> str | None:
    """The test under which ``layer_class.__init__`` assigns ``self.<attr> = <block_class>(...)``.

    ``self.mlp = Block(config) if test else MLP(config)`` gives ``test``; ``if test: self.mlp = Block(...)
    else: ...`` gives ``test`` (``not (test)`` when the block is built in the else branch). Only a test
    whose free names are ``config`` and ``layer_idx`` (the generated layer's own parameters) is kept.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(layer_class.__init__)))
    except (OSError, TypeError, SyntaxError):
        return None

    # ``cls = Block if test else MLP; self.mlp = cls(config)`` (Jamba): a local class choice is followed,
    # and a local value the test reads (``num_experts = config.layers_num_experts[layer_idx] ...``) inlined
    locals_: dict[str, ast.expr] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            locals_[node.targets[0].id] = node.value
    chosen = {
        name: value
        for name, value in locals_.items()
        if isinstance(value, ast.IfExp)
        and all(isinstance(side, ast.Name) for side in (value.body, value.orelse))
        and block_class in (value.body.id, value.orelse.id)  # type: ignore[attr-defined]
    }

    def builds_block(node: ast.AST | None) -> bool:
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == block_class

    def assigns(node: ast.stmt) -> ast.expr | None:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Attribute)
            and isinstance(node.targets[0].value, ast.Name)
            and node.targets[0].value.id == "self"
            and node.targets[0].attr == attr
        ):
            return node.value
        return None

    test: ast.expr | None = None
    for node in ast.walk(tree):
        value = assigns(node) if isinstance(node, ast.stmt) else None
        if isinstance(value, ast.IfExp):
            if builds_block(value.body):
                test = value.test
            elif builds_block(value.orelse):
                test = _negated(value.test)
        elif isinstance(node, ast.If):
            if any(builds_block(assigns(stmt)) for stmt in node.body if assigns(stmt) is not None):
                test = node.test
            elif any(builds_block(assigns(stmt)) for stmt in node.orelse if assigns(stmt) is not None):
                test = _negated(node.test)
        elif isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in chosen:
            choice = chosen[value.func.id]
            body = choice.body.id == block_class  # type: ignore[attr-defined]
            test = choice.test if body else _negated(choice.test)
        if test is not None:
            break
    if test is None:
        return None
    if isinstance(test, ast.Attribute) and isinstance(test.value, ast.Name) and test.value.id == "self":
        # `self.is_moe_layer = layer_idx in config.moe_layers` then `if self.is_moe_layer:` (Llama 4)
        flag = test.attr
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Attribute)
                and isinstance(node.targets[0].value, ast.Name)
                and node.targets[0].value.id == "self"
                and node.targets[0].attr == flag
            ):
                test = node.value
                break
    test = _inline_locals(test, locals_)
    names = {n.id for n in ast.walk(test) if isinstance(n, ast.Name)}
    if not names <= {"config", "layer_idx"} or any(isinstance(n, ast.Call) for n in ast.walk(test)):
        return None
    text = ast.unparse(test)
    return f"({text})" if isinstance(test, (ast.IfExp, ast.Lambda, ast.NamedExpr)) else text


def _inline_locals(test: ast.expr, locals_: dict[str, ast.expr]) -> ast.expr:
    """``test`` with each local name other than ``config`` / ``layer_idx`` replaced by the expression
    ``__init__`` assigned to it (once; a name assigned from itself is left)."""

    class Inline(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.expr:  # noqa: N802 - ast visitor protocol
            value = locals_.get(node.id)
            if node.id in ("config", "layer_idx") or value is None:
                return node
            if any(isinstance(n, ast.Name) and n.id == node.id for n in ast.walk(value)):
                return node
            return copy.deepcopy(value)

    return ast.fix_missing_locations(Inline().visit(copy.deepcopy(test)))


def _measured_layer_condition(
    config: PretrainedConfig, moe_layers: tuple[int, ...], num_layers: int
) -> tuple[str, tuple[int, ...]] | None:
    """A config field that names the MoE layers: a per-layer list whose value on exactly those
    layers is one kind (MiniCPM5-MoE's ``mlp_layer_types == "sparse"``), or a count of leading dense
    layers (AFMoE's ``num_dense_layers``)."""
    fields = {**config.to_dict(), **{k: v for k, v in vars(config).items() if not k.startswith("_")}}
    for name, value in fields.items():
        if not isinstance(value, list) or len(value) != num_layers:
            continue
        for kind in dict.fromkeys(value):
            if (
                isinstance(kind, (str, bool))
                and tuple(i for i, v in enumerate(value) if v == kind) == moe_layers
            ):
                return f"config.{name}[layer_idx] == {kind!r}", moe_layers
    for name, value in fields.items():
        if "dense" in name and isinstance(value, int) and not isinstance(value, bool):
            predicted = tuple(i for i in range(num_layers) if i >= value)
            if predicted == moe_layers:
                return f"layer_idx >= config.{name}", predicted
    return None


# --------------------------------------------------------------------------------------------------
# MLA
# --------------------------------------------------------------------------------------------------

_MLA_MODULES = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")


def analyze_mla(config: PretrainedConfig, model: nn.Module, layer: int = 0) -> MLASpec | None:
    """The multi-head latent attention of ``model`` (read on decoder layer ``layer``: a hybrid stack's
    first attention layer), or None when its attention is not MLA."""
    layers = _decoder_layers(model)
    found = next(
        (
            (name, child)
            for name, child in layers[layer].named_children()
            if hasattr(child, "kv_a_proj_with_mqa")
        ),
        None,
    )
    if found is None:
        return None
    attr, attn = found
    path = f"model.layers.{layer}.{attr}"
    missing = [name for name in _MLA_MODULES if not isinstance(getattr(attn, name, None), nn.Module)]
    if missing:
        raise UnsupportedFeature(path, f"MLA without {', '.join(missing)}")
    head_gate = _mla_head_gate(config, attn)
    indexer = _mla_indexer(config, model, attn, path, frozenset({head_gate} - {None}))
    if indexer is not None:
        _refuse_shared_index_layers(layers, attr, indexer.attr)
    q_lora = isinstance(getattr(attn, "q_a_proj", None), nn.Module)
    nope, rope, v_dim = attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim
    heads = attn.kv_b_proj.out_features // (nope + v_dim)
    if attn.kv_a_proj_with_mqa.out_features != attn.kv_lora_rank + rope or attn.kv_b_proj.bias is not None:
        raise UnsupportedFeature(
            f"{path}.kv_a_proj_with_mqa", "latent KV layout other than [kv_lora_rank + rope]"
        )
    uses_interleave = _class_reads_attribute(type(attn), "rope_interleave")
    if uses_interleave and not hasattr(config, "rope_interleave"):
        raise UnsupportedFeature(path, "interleaved RoPE switch without config.rope_interleave")
    return MLASpec(
        class_name=type(attn).__name__,
        attr=attr,
        config_class=type(config).__name__,
        norm_class=type(attn.kv_a_layernorm).__name__,
        norm_eps=_latent_norm_eps(config, attn),
        num_heads=heads,
        q_lora=q_lora,
        kv_lora_rank=attn.kv_lora_rank,
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=v_dim,
        rope_interleave=uses_interleave,
        yarn_mscale=_folds_yarn_mscale(config, attn, path),
        scaling=float(attn.scaling),
        # one complex table (DeepSeek-V2's freqs_cis) multiplies channel pairs (2i, 2i+1): always interleaved
        rope_pairs=_complex_rotary_table(model) or (not uses_interleave and rotates_channel_pairs(attn)),
        indexer=indexer,
        head_gate=head_gate,
    )


def _mla_head_gate(config: PretrainedConfig, attn: nn.Module) -> str | None:
    """The child that gates each head's output, ``attn * sigmoid(gate(h))`` per head (Ling 3's
    ``g_proj``): the one extra linear map from the hidden states to one value per head, no bias."""
    heads = attn.kv_b_proj.out_features // (attn.qk_nope_head_dim + attn.v_head_dim)
    gates = [
        name
        for name, child in attn.named_children()
        if name not in _MLA_KNOWN
        and isinstance(child, nn.Linear)
        and child.bias is None
        and (child.in_features, child.out_features) == (config.hidden_size, heads)
    ]
    return gates[0] if len(gates) == 1 else None


def _refuse_shared_index_layers(layers: list[nn.Module], attr: str, name: str) -> None:
    """Every decoder layer's attention must run its own indexer: a layer without one reuses an earlier
    layer's top-k selection (GLM-MoE-DSA's ``"shared"`` indexer layers), which no template covers."""
    for i, layer in enumerate(layers):
        if not isinstance(getattr(getattr(layer, attr), name, None), nn.Module):
            raise UnsupportedFeature(
                f"model.layers.{i}.{attr}",
                "a sparse-attention layer without its own indexer (it reuses an earlier layer's top-k keys)",
                "cross-layer top-k sharing is not templated; a config whose layers all run their indexer passes",
            )


def _mla_indexer(
    config: PretrainedConfig,
    model: nn.Module,
    attn: nn.Module,
    path: str,
    known: frozenset[str] = frozenset(),
) -> IndexerSpec | None:
    """The sparse-attention indexer among the MLA attention's children (measured), None without one;
    any other extra child is refused (:func:`_refuse_extra_mla_modules`)."""
    extras = [
        (name, child)
        for name, child in attn.named_children()
        if name not in _MLA_KNOWN | known and not isinstance(child, nn.Dropout)
    ]
    if len(extras) == 1 and "topk" in inspect.getsource(type(extras[0][1])):
        return analyze_mla_indexer(config, model, attn, extras[0][0], path)
    _refuse_extra_mla_modules(attn, path, known)
    return None


#: Children an MLA attention may have: the latent projections and norms, and the q projection.
_MLA_KNOWN = frozenset({*_MLA_MODULES, "q_a_proj", "q_a_layernorm", "q_b_proj", "q_proj"})


def _refuse_extra_mla_modules(attn: nn.Module, path: str, known: frozenset[str] = frozenset()) -> None:
    """An MLA attention with a module besides its projections and latent norms (DeepSeek-V3.2's and
    GLM-MoE-DSA's lightning indexer, which picks the top-k keys each query attends to) is refused."""
    for name, child in attn.named_children():
        if name in _MLA_KNOWN | known or isinstance(child, nn.Dropout):
            continue
        source = inspect.getsource(type(child))
        feature = (
            "a sparse-attention indexer (each query attends only to the top-k keys it scores)"
            if "topk" in source
            else "a module besides the latent projections and norms"
        )
        raise UnsupportedFeature(
            f"{path}.{name}",
            f"MLA with {type(child).__name__}: {feature}; no attention template covers it",
        )


def _complex_rotary_table(model: nn.Module) -> bool:
    """Whether the model's rotary module returns complex frequencies (one table) instead of cos/sin."""
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if not isinstance(rotary, nn.Module):
        return False
    hidden = torch.zeros(1, 2, model.config.hidden_size)
    table = rotary(hidden, torch.arange(2)[None])
    return torch.is_complex(table if isinstance(table, torch.Tensor) else table[0])


def _class_reads_attribute(cls: type, name: str) -> bool:
    """Whether the source of ``cls`` itself (not its module) reads an attribute ``name``: ``x.name`` or
    ``getattr(x, "name", ...)``. Comments, docstrings and other classes do not count."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == name:
            return True
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value == name
        ):
            return True
    return False


# A YaRN setting whose mscale_all_dim changes the softmax scale by a factor far from 1.
_YARN_PROBE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "original_max_position_embeddings": 64,
}


def _folds_yarn_mscale(config: PretrainedConfig, attn: nn.Module, path: str) -> bool:
    """Whether the HF attention multiplies its softmax scale by YaRN's ``mscale(factor, mscale_all_dim)**2``,
    measured by rebuilding it under a default and a YaRN RoPE config (transformers moved this from the
    model's module into ``modeling_rope_utils`` in 5.25, so reading the module's text is not enough)."""
    scales = {}
    for rope_type in ("default", "yarn"):
        probe = copy.deepcopy(config)
        probe.rope_parameters = (
            dict(_YARN_PROBE) if rope_type == "yarn" else {"rope_type": "default", "rope_theta": 10000.0}
        )
        scales[rope_type] = float(type(attn)(probe, 0).scaling)
    if math.isclose(scales["yarn"], scales["default"], rel_tol=1e-9):
        return False
    mscale = 0.1 * _YARN_PROBE["mscale_all_dim"] * math.log(_YARN_PROBE["factor"]) + 1.0
    if math.isclose(scales["yarn"], scales["default"] * mscale**2, rel_tol=1e-6):
        return True
    raise UnsupportedFeature(
        path, f"YaRN changes the softmax scale by {scales['yarn'] / scales['default']:.6g}, not by mscale**2"
    )


def _norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if isinstance(getattr(norm, name, None), float):
            return getattr(norm, name)
    raise UnsupportedFeature(type(norm).__name__, "latent norm without a float epsilon")


def _latent_norm_eps(config: PretrainedConfig, attn: nn.Module) -> str:
    """``config.rms_norm_eps`` when the latent norms follow it (checked by rebuilding the attention
    with another value), else the literal epsilon (DeepSeek's norms keep their class default)."""
    eps = {
        _norm_eps(norm)
        for norm in (getattr(attn, "q_a_layernorm", None), attn.kv_a_layernorm)
        if isinstance(norm, nn.Module)
    }
    if len(eps) != 1:
        raise UnsupportedFeature(type(attn).__name__, f"latent norms with different epsilons {sorted(eps)}")
    value = eps.pop()
    if getattr(config, "rms_norm_eps", None) is not None:
        probe = copy.deepcopy(config)
        probe.rms_norm_eps = 0.125
        if _norm_eps(type(attn)(probe, 0).kv_a_layernorm) == 0.125:
            return "config.rms_norm_eps"
    return repr(value)
