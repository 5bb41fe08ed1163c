"""Measure the token mixers that are not attention: gated delta rule and gated short convolution.

A mixer is recognised by what it is built from, not by its name: a depthwise ``nn.Conv1d`` child
(groups = channels); with two per-head 1-D parameters (decay and time-step bias) and a gated norm it
is a gated delta rule mixer (Qwen3-Next, Qwen3.5), with one in-projection three times the conv width
and nothing else a gated short convolution (LFM2). Widths come from the weight shapes; what shapes
cannot tell (how a fused in-projection orders its parts, per key head or flat, which 1-D parameter is
the decay, whether the conv is activated, the gate before or after the norm) is fitted: each
candidate spec is emitted, loaded with the transformers module's weights (``strict=True``) and run
on the same input, and the first whose output matches is kept. Config expressions are confirmed by
rebuilding the module from a config with the field changed.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.emit_mixers import emit_mixer_classes
from onboardlm.onboard.spec_mixers import (
    DeltaProjectionSpec,
    GatedDeltaSpec,
    MixerSpec,
    ShortConvSpec,
)

_HINT = "teach onboardlm/onboard/analyze_mixers.py this token mixer"
#: Relative RMSE below which a candidate reproduces the transformers module (fp32, different scan order).
_FIT_TOL = 1e-4
#: Orders the parts may take over the in-projections (in their registration order): Qwen3-Next and
#: Qwen3.5 [q k v z b a], OLMo Hybrid's separate projections [q k v a b g(=z)].
_DELTA_ORDERS = (
    ("q", "k", "v", "z", "b", "a"),
    ("q", "k", "v", "z", "a", "b"),
    ("q", "k", "v", "a", "b", "z"),
    ("q", "k", "v", "b", "a", "z"),
)
_CONV_ORDERS = (
    ("pre_gate", "post_gate", "value"),
    ("pre_gate", "value", "post_gate"),
    ("post_gate", "pre_gate", "value"),
)


def depthwise_conv(module: nn.Module) -> tuple[str, nn.Conv1d] | None:
    """The module's one depthwise Conv1d child (groups = in = out channels), if any."""
    found = [
        (name, child)
        for name, child in module.named_children()
        if isinstance(child, nn.Conv1d) and child.groups == child.in_channels == child.out_channels
    ]
    if len(found) > 1:
        raise UnsupportedFeature(
            type(module).__name__, "more than one depthwise conv in one token mixer", _HINT
        )
    return found[0] if found else None


def mixer_kind(module: nn.Module) -> str | None:
    """``"gated_delta"``, ``"short_conv"`` or None, from the module's parts: a depthwise conv with two
    per-head vectors of its own (decay, time-step bias; Mamba2 has a third, D) and one gated norm, or
    a depthwise conv between two linear maps and nothing else with weights."""
    if depthwise_conv(module) is None:
        return None
    vectors = [p for p in module.parameters(recurse=False) if p.dim() == 1]
    weighted = [c for c in module.children() if any(True for _ in c.parameters())]
    linears = [c for c in weighted if isinstance(c, nn.Linear)]
    if len(vectors) == 2 and len(weighted) - len(linears) == 2:  # the conv and the gated norm
        return "gated_delta"
    if not vectors and len(linears) == 2 and len(weighted) == 3:
        return "short_conv"
    return None


def is_gated_delta(module: nn.Module) -> bool:
    """Recogniser for hybrid stacks (``analyze_hybrid.MIXER_RECOGNISERS``)."""
    return mixer_kind(module) == "gated_delta"


def is_short_conv(module: nn.Module) -> bool:
    return mixer_kind(module) == "short_conv"


def is_channel_decay_delta(module: nn.Module) -> bool:
    """A depthwise conv and, instead of per-head decay vectors, a child that computes the decay from
    the input with linear maps and weights of its own (Kimi Delta Attention's forget gate: one decay
    per key channel), measured by :mod:`onboardlm.onboard.analyze_kda`."""
    if depthwise_conv(module) is None or any(p.dim() == 1 for p in module.parameters(recurse=False)):
        return False
    return any(
        any(True for _ in child.parameters(recurse=False))
        and any(isinstance(c, nn.Linear) for c in child.children())
        for child in module.children()
    )


def analyze_mixer(config: PretrainedConfig, module: nn.Module, path: str, layer_idx: int) -> MixerSpec | None:
    """The spec of ``module`` (the token mixer of decoder layer ``layer_idx`` at ``path``), or None when
    it is not a mixer this module knows; UnsupportedFeature where it looks like one but fits no spec."""
    kind = mixer_kind(module)
    if kind is None:
        return None
    attr = path.rsplit(".", 1)[-1]
    probe = _Probe(config, module, path, layer_idx)
    return probe.gated_delta(attr) if kind == "gated_delta" else probe.short_conv(attr)


class _Probe:
    def __init__(self, config: PretrainedConfig, module: nn.Module, path: str, layer_idx: int) -> None:
        self.config, self.module, self.path, self.layer_idx = config, module, path, layer_idx
        self.hidden = config.hidden_size
        generator = torch.Generator().manual_seed(0)
        self.input = torch.randn(2, 9, self.hidden, generator=generator)
        with torch.no_grad():
            out = module(self.input)
        self.expected = out[0] if isinstance(out, (tuple, list)) else out

    # ------------------------------------------------------------------------------ gated delta rule

    def gated_delta(self, attr: str) -> GatedDeltaSpec:
        module, path = self.module, self.path
        conv_name, conv = depthwise_conv(module)
        vectors = [(n, p) for n, p in module.named_parameters(recurse=False) if p.dim() == 1]
        num_v = vectors[0][1].numel()
        norms = [
            (n, c)
            for n, c in module.named_children()
            if not isinstance(c, (nn.Linear, nn.Conv1d))
            and isinstance(getattr(c, "weight", None), nn.Parameter)
        ]
        if len(norms) != 1 or vectors[1][1].numel() != num_v:
            raise UnsupportedFeature(
                path, "gated delta mixer without one per-head norm and two per-head vectors", _HINT
            )
        norm_name, norm = norms[0]
        head_v = norm.weight.numel()
        value_dim = num_v * head_v
        key_dim, rest = divmod(conv.in_channels - value_dim, 2)
        if rest or key_dim <= 0:
            raise UnsupportedFeature(path, f"conv width {conv.in_channels} is not [q | k | v]", _HINT)
        linears = [(n, c) for n, c in module.named_children() if isinstance(c, nn.Linear)]
        outs = [n for n, c in linears if c.out_features == self.hidden and c.in_features == value_dim]
        if not outs:
            raise UnsupportedFeature(path, "no output projection from the value heads", _HINT)
        widths = {"q": key_dim, "k": key_dim, "v": value_dim, "z": value_dim, "b": num_v, "a": num_v}
        head_k_values = [d for d in range(1, key_dim + 1) if key_dim % d == 0 and num_v % (key_dim // d) == 0]
        head_k_values.sort(
            key=lambda d: (d != head_v, -d)
        )  # likeliest first: key heads as wide as value heads
        activations = [*self._activations(), None]

        def candidates(write_scale: str = "") -> Iterator[GatedDeltaSpec]:
            for out_name, order in itertools.product(outs, _DELTA_ORDERS):
                ins = [
                    (n, c.out_features) for n, c in linears if c.in_features == self.hidden and n != out_name
                ]
                parts = _split_parts(ins, order, widths)
                if parts is None:
                    continue
                multi = [i for i, (_, p) in enumerate(parts) if len(p) > 1]
                for head_k, grouped, (decay, step), before, act in itertools.product(
                    head_k_values,
                    itertools.product((True, False), repeat=len(multi)),
                    (vectors, vectors[::-1]),
                    (True, False),
                    activations,
                ):
                    flags = dict(zip(multi, grouped, strict=True))
                    yield GatedDeltaSpec(  # noqa: B023 - consumed inside the loop
                        class_name=type(module).__name__,
                        attr=attr,
                        projections=tuple(
                            DeltaProjectionSpec(
                                name,
                                "True" if getattr(module, name).bias is not None else "False",
                                p,
                                flags.get(i, False),
                            )
                            for i, (name, p) in enumerate(parts)
                        ),
                        conv=conv_name,
                        conv_bias="True" if conv.bias is not None else "False",
                        conv_activation=None if act is None else repr(act),
                        out=out_name,
                        out_bias="True" if getattr(module, out_name).bias is not None else "False",
                        A_log=decay[0],
                        dt_bias=step[0],
                        norm=norm_name,
                        norm_class=type(norm).__name__,
                        norm_eps=repr(_eps(norm)),
                        norm_before_gate=before,
                        num_v_heads=str(num_v),
                        num_k_heads=str(key_dim // head_k),
                        head_k_dim=str(head_k),
                        head_v_dim=str(head_v),
                        kernel_size=str(conv.kernel_size[0]),
                        hidden_size=str(self.hidden),
                        write_scale=write_scale,
                    )

        varied = (
            "in-projection part orders and groupings, key head dims, decay/bias roles, conv activation, gate"
            " before/after the norm, write strength sigmoid(b) or 2 sigmoid(b)"
        )
        try:
            spec = self._fit(candidates(), "gated delta mixer", varied)
        except UnsupportedFeature:  # a doubled write strength (negative eigenvalues) is tried second
            spec = self._fit(candidates("2.0"), "gated delta mixer", varied)
            spec = dataclasses.replace(spec, write_scale=self._write_scale_expression(spec))
        head_k = int(spec.head_k_dim)
        num_k = key_dim // head_k
        if num_k == head_k:
            raise UnsupportedFeature(
                path, f"key heads and key head dim are both {head_k}: the fields cannot be told apart", _HINT
            )

        def rebuilt_key_dim(m: nn.Module) -> int:
            return (depthwise_conv(m)[1].in_channels - _value_dim(m, norm_name)) // 2

        return dataclasses.replace(
            spec,
            projections=tuple(dataclasses.replace(p, bias=self._bias(p.name)) for p in spec.projections),
            conv_bias=self._bias(conv_name),
            conv_activation=self._activation_expression(spec.conv_activation),
            out_bias=self._bias(spec.out),
            norm_eps=self._eps_expression(norm_name, _eps(norm)),
            num_v_heads=self._int_expression(num_v, lambda m: getattr(m, spec.A_log).numel(), "value heads"),
            num_k_heads=self._int_expression(num_k, rebuilt_key_dim, "key heads", scale=head_k),
            head_k_dim=self._int_expression(head_k, rebuilt_key_dim, "key head dim", scale=num_k),
            head_v_dim=self._int_expression(
                head_v, lambda m: getattr(m, norm_name).weight.numel(), "value head dim"
            ),
            kernel_size=self._int_expression(
                conv.kernel_size[0], lambda m: depthwise_conv(m)[1].kernel_size[0], "conv kernel"
            ),
            hidden_size="config.hidden_size",
        )

    # ------------------------------------------------------------------------------ short convolution

    def short_conv(self, attr: str) -> ShortConvSpec:
        module, path = self.module, self.path
        conv_name, conv = depthwise_conv(module)
        width = conv.in_channels
        linears = [(n, c) for n, c in module.named_children() if isinstance(c, nn.Linear)]
        ins = [(n, c) for n, c in linears if c.in_features == self.hidden and c.out_features == 3 * width]
        outs = [
            (n, c)
            for n, c in linears
            if c.in_features == width and c.out_features == self.hidden and (n, c) not in ins
        ]
        if len(ins) != 1 or len(outs) != 1 or len(linears) != 2:
            raise UnsupportedFeature(
                path,
                "short conv without one in-projection to 3 x the conv width and one output projection",
                _HINT,
            )
        (in_name, _), (out_name, _) = ins[0], outs[0]
        activations = [None, *self._activations()]
        candidates = (
            ShortConvSpec(
                class_name=type(module).__name__,
                attr=attr,
                in_proj=in_name,
                in_bias="True" if getattr(module, in_name).bias is not None else "False",
                parts=order,
                conv=conv_name,
                conv_bias="True" if conv.bias is not None else "False",
                conv_activation=None if act is None else repr(act),
                out=out_name,
                out_bias="True" if getattr(module, out_name).bias is not None else "False",
                kernel_size=str(conv.kernel_size[0]),
                width=str(width),
                hidden_size=str(self.hidden),
            )
            for order, act in itertools.product(_CONV_ORDERS, activations)
        )
        spec = self._fit(candidates, "short conv mixer", "chunk orders of the in-projection, conv activation")
        return dataclasses.replace(
            spec,
            in_bias=self._bias(in_name),
            conv_bias=self._bias(conv_name),
            conv_activation=self._activation_expression(spec.conv_activation),
            out_bias=self._bias(out_name),
            kernel_size=self._int_expression(
                conv.kernel_size[0], lambda m: depthwise_conv(m)[1].kernel_size[0], "conv kernel"
            ),
            width=self._int_expression(width, lambda m: depthwise_conv(m)[1].in_channels, "conv width"),
            hidden_size="config.hidden_size",
        )

    # ------------------------------------------------------------------------------ fitting

    def _fit(self, candidates: Iterator[MixerSpec], what: str, varied: str) -> MixerSpec:
        tried = 0
        for spec in candidates:
            tried += 1
            if self._reproduces(spec):
                return spec
        raise UnsupportedFeature(
            f"{self.path} ({type(self.module).__name__})",
            f"{what} whose output none of {tried} candidate layouts on the canonical ops reproduces"
            f" (varied: {varied})",
            _HINT,
        )

    def _reproduces(self, spec: MixerSpec) -> bool:
        try:
            lean = build_mixer(spec, self.config, self.layer_idx)
            lean.load_state_dict(self.module.state_dict(), strict=True)
            with torch.no_grad():
                out = lean(self.input)
        except (RuntimeError, ValueError, TypeError):  # a candidate whose shapes do not fit
            return False
        return out.shape == self.expected.shape and relative_rmse(out, self.expected) < _FIT_TOL

    # ------------------------------------------------------------------------------ config expressions

    def _rebuild(self, field: str, value: Any) -> nn.Module | None:
        """The module built again from the config with ``field`` set to ``value``; None when the config
        or the module refuses that value (which confirms nothing)."""
        probe = copy.deepcopy(self.config)
        try:
            setattr(probe, field, value)
            return type(self.module)(probe, self.layer_idx)
        except Exception:  # noqa: BLE001 - transformers raises anything from a config it cannot take
            return None

    def _int_expression(
        self, value: int, measure: Callable[[nn.Module], int], what: str, scale: int = 1
    ) -> str:
        """``config.<field>`` for the int field the module follows: rebuilt with the field doubled, the
        measured quantity (``value * scale``) doubles."""
        fields = [
            n
            for n, v in _fields(self.config).items()
            if isinstance(v, int) and not isinstance(v, bool) and v == value
        ]
        for name in fields:
            rebuilt = self._rebuild(name, 2 * value)
            if rebuilt is not None and measure(rebuilt) == 2 * value * scale:
                return f"config.{name}"
        raise UnsupportedFeature(
            self.path, f"{what} = {value} follows no config field (rebuilt with each doubled)", _HINT
        )

    def _write_scale_expression(self, spec: GatedDeltaSpec) -> str:
        """``2.0 if config.<flag> else 1.0`` for the bool field that, turned off, leaves the write
        strength at sigmoid(b) (the module rebuilt with it False fits the spec at scale 1)."""
        plain = dataclasses.replace(spec, write_scale="")
        for name, value in _fields(self.config).items():
            if value is not True:
                continue
            rebuilt = self._rebuild(name, False)
            if rebuilt is None:
                continue
            try:
                rebuilt.load_state_dict(self.module.state_dict(), strict=True)
                lean = build_mixer(plain, self.config, self.layer_idx)
                lean.load_state_dict(self.module.state_dict(), strict=True)
                with torch.no_grad():
                    expected, out = rebuilt.eval()(self.input), lean(self.input)
            except (RuntimeError, ValueError, TypeError):
                continue
            expected = expected[0] if isinstance(expected, (tuple, list)) else expected
            if out.shape == expected.shape and relative_rmse(out, expected) < _FIT_TOL:
                return f"2.0 if config.{name} else 1.0"
        raise UnsupportedFeature(
            self.path, "a write strength of 2 sigmoid(b) that follows no bool config field", _HINT
        )

    def _eps_expression(self, norm_name: str, value: float) -> str:
        for name, field_value in _fields(self.config).items():
            if isinstance(field_value, float) and field_value == value:
                rebuilt = self._rebuild(name, 0.125)
                if rebuilt is not None and _eps(getattr(rebuilt, norm_name)) == 0.125:
                    return f"config.{name}"
        return repr(value)

    def _bias(self, name: str) -> str:
        """``"True"`` / ``"False"``, or ``config.<flag>`` (``not config.<flag>``) where a bool field
        switches the bias of child ``name``, checked by rebuilding with the field flipped."""
        has = getattr(self.module, name).bias is not None
        for field, value in _fields(self.config).items():
            if not isinstance(value, bool):
                continue
            rebuilt = self._rebuild(field, not value)
            if rebuilt is not None and (getattr(rebuilt, name).bias is not None) != has:
                return f"config.{field}" if value == has else f"not config.{field}"
        return repr(has)

    def _activations(self) -> list[str]:
        """Activation names a conv output may go through: the config's string fields that name one."""
        return sorted(
            {v for v in _fields(self.config).values() if isinstance(v, str) and v in ACT2FN},
            key=lambda v: (v != getattr(self.config, "hidden_act", None), v),
        )

    def _activation_expression(self, literal: str | None) -> str | None:
        """``config.<field>`` naming the fitted activation (``hidden_act`` first), else the literal."""
        if literal is None:
            return None
        value = eval(literal, {"__builtins__": {}})  # noqa: S307 - a repr the fit wrote
        fields = sorted(
            (n for n, v in _fields(self.config).items() if isinstance(v, str) and v == value),
            key=lambda n: (n != "hidden_act", n),
        )
        return f"config.{fields[0]}" if fields else literal


def _split_parts(
    projections: list[tuple[str, int]], order: tuple[str, ...], widths: dict[str, int]
) -> list[tuple[str, tuple[str, ...]]] | None:
    """Deal the parts in ``order`` to the projections (in their order) so each gets parts summing to
    its output width; None when the widths do not add up."""
    dealt, index = [], 0
    for name, width in projections:
        taken: list[str] = []
        while index < len(order) and sum(widths[p] for p in taken) < width:
            taken.append(order[index])
            index += 1
        if sum(widths[p] for p in taken) != width:
            return None
        dealt.append((name, tuple(taken)))
    return dealt if index == len(order) else None


def _value_dim(module: nn.Module, norm_name: str) -> int:
    vectors = [p for p in module.parameters(recurse=False) if p.dim() == 1]
    return vectors[0].numel() * getattr(module, norm_name).weight.numel()


def _eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if isinstance(getattr(norm, name, None), float):
            return getattr(norm, name)
    raise UnsupportedFeature(type(norm).__name__, "gated norm without a float epsilon", _HINT)


def _fields(config: PretrainedConfig) -> dict[str, Any]:
    return {**config.to_dict(), **{k: getattr(config, k) for k in vars(config) if not k.startswith("_")}}


def relative_rmse(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """RMSE of the difference over the RMS of ``expected`` (fp32)."""
    diff = (actual.float() - expected.float()).pow(2).mean().sqrt()
    return float(diff.detach() / expected.detach().float().pow(2).mean().sqrt().clamp_min(1e-12))


def build_mixer(spec: MixerSpec, config: PretrainedConfig, layer_idx: int = 0) -> nn.Module:
    """The emitted block class of ``spec``, executed and instantiated for ``config``."""
    config_class = type(config).__name__
    namespace: dict[str, Any] = {
        "torch": torch,
        "nn": nn,
        "F": torch.nn.functional,
        "ACT2FN": ACT2FN,
        config_class: type(config),
    }
    import onboardlm.ops  # noqa: F401,PLC0415  (registers torch.ops.auto_deploy.*)

    exec(compile(emit_mixer_classes(spec, config_class), f"<{spec.class_name}>", "exec"), namespace)  # noqa: S102
    return namespace[spec.class_name](config, layer_idx).eval()
