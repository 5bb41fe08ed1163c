"""Measure a gated delta rule mixer with a per-channel decay (Kimi Delta Attention).

Recognised by ``analyze_mixers.is_channel_decay_delta`` (a depthwise conv, no per-head vectors of its
own, a child computing the decay from the input with linear maps). Everything is read from the
module, never from names:

* widths from the weights: the forget-gate child's two parameters are the per-head rate (``H``
  entries, any shape: ``[H]`` or ``[1, 1, H, 1]``) and the per-key-channel bias (``H * K``); the
  write-strength projection maps the hidden states to ``H``; the gated norm's weight is one value
  head (``V``); the conv spans ``2 H K + H V`` channels;
* the forget gate's form from a probe of the child alone: ``-exp(A_log) * softplus(f + dt_bias)``
  or ``lower_bound * sigmoid(exp(A_log) * (f + dt_bias))``; the bound's config field and the bool
  field that switches between the two are confirmed by rebuilding the mixer with them changed;
* which same-width projection is q, k, v or the output gate, the conv activation and the norm's gate
  activation are fitted: each candidate is emitted, loaded with the module's weights (``strict``)
  and run on the probe input; the first that reproduces the module's output is kept.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PretrainedConfig

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.analyze_mixers import _FIT_TOL, _eps, _fields, _Probe, depthwise_conv
from onboardlm.onboard.spec_mixers import ChannelDeltaSpec, LinearSpec

_HINT = "teach onboardlm/onboard/analyze_kda.py this form of Kimi Delta Attention"


def _gate_child(module: nn.Module) -> tuple[str, nn.Module] | None:
    for name, child in module.named_children():
        if any(True for _ in child.parameters(recurse=False)) and any(
            isinstance(c, nn.Linear) for c in child.children()
        ):
            return name, child
    return None


def _chain(
    linears: list[tuple[str, nn.Linear]], source: int, target: int
) -> list[tuple[str, nn.Linear]] | None:
    """One map ``source -> target``, or a pair ``source -> r -> target`` among ``linears``."""
    for name, linear in linears:
        if linear.in_features == source and linear.out_features == target:
            return [(name, linear)]
    for (a, first), (b, second) in itertools.permutations(linears, 2):
        if (
            first.in_features == source
            and second.in_features == first.out_features
            and second.out_features == target
        ):
            return [(a, first), (b, second)]
    return None


def analyze_channel_delta(
    config: PretrainedConfig, module: nn.Module, path: str, layer_idx: int
) -> ChannelDeltaSpec:
    return _KdaProbe(config, module, path, layer_idx).spec(path.rsplit(".", 1)[-1])


class _KdaProbe(_Probe):
    def spec(self, attr: str) -> ChannelDeltaSpec:
        module, path, hidden = self.module, self.path, self.hidden
        conv_name, conv = depthwise_conv(module)
        found = _gate_child(module)
        if found is None:
            raise UnsupportedFeature(path, "per-channel delta rule without a forget-gate child", _HINT)
        gate_attr, gate = found
        params = sorted(gate.named_parameters(recurse=False), key=lambda item: item[1].numel())
        if len(params) != 2:
            raise UnsupportedFeature(
                f"{path}.{gate_attr}",
                "forget gate without exactly a per-head rate and a per-channel bias",
                _HINT,
            )
        (a_name, a_log), (dt_name, dt_bias) = params
        heads, key_dim = a_log.numel(), dt_bias.numel()
        if dt_bias.dim() != 1 or key_dim % heads or a_log.numel() != max(a_log.shape):
            raise UnsupportedFeature(
                f"{path}.{gate_attr}", "forget-gate parameters of no per-head layout", _HINT
            )
        head_k = key_dim // heads
        if head_k == heads:
            raise UnsupportedFeature(
                path, f"heads and key head dim are both {heads}: cannot be told apart", _HINT
            )
        norms = [
            (n, c)
            for n, c in module.named_children()
            if not isinstance(c, (nn.Linear, nn.Conv1d))
            and c is not gate
            and isinstance(getattr(c, "weight", None), nn.Parameter)
        ]
        if len(norms) != 1:
            raise UnsupportedFeature(path, "per-channel delta rule without one per-head gated norm", _HINT)
        norm_name, norm = norms[0]
        head_v = norm.weight.numel()
        value_dim = heads * head_v
        if conv.in_channels != 2 * key_dim + value_dim:
            raise UnsupportedFeature(path, f"conv width {conv.in_channels} is not [q | k | v]", _HINT)
        linears = [(n, c) for n, c in module.named_children() if isinstance(c, nn.Linear)]
        gate_linears = [(n, c) for n, c in gate.named_children() if isinstance(c, nn.Linear)]
        gate_chain = _chain(gate_linears, hidden, key_dim)
        betas = [(n, c) for n, c in linears if c.in_features == hidden and c.out_features == heads]
        outs = [(n, c) for n, c in linears if c.in_features == value_dim and c.out_features == hidden]
        if gate_chain is None or len(gate_chain) != len(gate_linears) or len(betas) != 1 or not outs:
            raise UnsupportedFeature(
                path,
                "per-channel delta rule without one forget-gate chain to the key channels, one write-strength"
                " projection per head and one output projection",
                _HINT,
            )
        rest = [(n, c) for n, c in linears if n != betas[0][0]]
        decay_form = self._decay_form(gate_attr, gate, gate_chain, a_name, dt_name)

        def linear_spec(name: str, layer: nn.Linear, in_width: str, out_width: str) -> LinearSpec:
            return LinearSpec(name, "True" if layer.bias is not None else "False", in_width, out_width)

        gate_widths = ["hidden_size", "key_dim"]
        if len(gate_chain) == 2:
            gate_widths.insert(1, str(gate_chain[0][1].out_features))
        gate_specs = tuple(
            linear_spec(n, c, gate_widths[i], gate_widths[i + 1]) for i, (n, c) in enumerate(gate_chain)
        )
        a_shape = tuple("self.num_heads" if n == heads else str(n) for n in a_log.shape)

        def candidates() -> Iterator[ChannelDeltaSpec]:
            # the output projection is likeliest the last one registered, q, k, v the first ones
            for out, (q, k, v) in itertools.product(outs[::-1], itertools.permutations(rest, 3)):
                widths = (q[1].out_features, k[1].out_features, v[1].out_features)
                if widths != (key_dim, key_dim, value_dim) or out[0] in (q[0], k[0], v[0]):
                    continue
                if any(c.in_features != hidden for _, c in (q, k, v)):
                    continue
                others = [(n, c) for n, c in rest if n not in (q[0], k[0], v[0], out[0])]
                out_gate = _chain(others, hidden, value_dim)
                if out_gate is None or len(out_gate) != len(others):
                    continue
                widths = ["hidden_size", "self.value_dim"]
                if len(out_gate) == 2:
                    widths.insert(1, str(out_gate[0][1].out_features))
                for act, gate_act in itertools.product([*self._activations(), None], ("sigmoid", "silu")):
                    yield ChannelDeltaSpec(
                        class_name=type(module).__name__,
                        attr=attr,
                        children=tuple(n for n, _ in module.named_children()),
                        q=linear_spec(q[0], q[1], "hidden_size", "self.key_dim"),
                        k=linear_spec(k[0], k[1], "hidden_size", "self.key_dim"),
                        v=linear_spec(v[0], v[1], "hidden_size", "self.value_dim"),
                        conv=conv_name,
                        conv_bias="True" if conv.bias is not None else "False",
                        conv_activation=None if act is None else repr(act),
                        gate_attr=gate_attr,
                        gate_class=type(gate).__name__,
                        gate_children=tuple(
                            n
                            for n, _ in itertools.chain(
                                gate.named_parameters(recurse=False), gate.named_children()
                            )
                        ),
                        gate_chain=gate_specs,
                        A_log=a_name,
                        A_log_shape=a_shape,
                        dt_bias=dt_name,
                        bound_flag=decay_form[0],
                        lower_bound=decay_form[1],
                        decay_in_input_dtype=decay_form[2],
                        beta=linear_spec(betas[0][0], betas[0][1], "hidden_size", "self.num_heads"),
                        out_gate=tuple(
                            linear_spec(n, c, widths[i], widths[i + 1]) for i, (n, c) in enumerate(out_gate)
                        ),
                        norm=norm_name,
                        norm_class=type(norm).__name__,
                        norm_eps=repr(_eps(norm)),
                        norm_gate_act=gate_act,
                        out=linear_spec(out[0], out[1], "self.value_dim", "hidden_size"),
                        num_heads=str(heads),
                        head_k_dim=str(head_k),
                        head_v_dim=str(head_v),
                        kernel_size=str(conv.kernel_size[0]),
                        hidden_size=str(hidden),
                    )

        spec = self._fit(
            candidates(),
            "per-channel delta rule mixer",
            "which projection is q, k, v or the output gate, conv activation, norm gate activation",
        )
        return self._expressions(spec, gate_attr, gate_chain, norm_name)

    # ------------------------------------------------------------------------------ the forget gate

    def _decay_form(
        self, gate_attr: str, gate: nn.Module, chain: list[tuple[str, nn.Linear]], a_name: str, dt_name: str
    ) -> tuple[str | None, str | None, bool]:
        """(bool field switching the bounded form on, its bound expression, output cast to the input
        dtype), measured on the forget-gate child alone."""
        form = _gate_form(gate, chain, a_name, dt_name, self.input)
        if form is None:
            raise UnsupportedFeature(
                f"{self.path}.{gate_attr} ({type(gate).__name__})",
                "forget gate that is neither -exp(A_log) * softplus(f + dt_bias) nor"
                " lower_bound * sigmoid(exp(A_log) * (f + dt_bias))",
                _HINT,
            )
        with torch.no_grad():
            half = copy.deepcopy(gate).to(torch.bfloat16)
            casts = half(self.input.to(torch.bfloat16)).dtype == torch.bfloat16
        if form == "softplus":
            return None, None, casts
        bound = form
        bound_expr = self._float_expression(bound, gate_attr, chain, a_name, dt_name)
        return self._bound_flag(gate_attr, chain, a_name, dt_name), bound_expr, casts

    def _rebuilt_gate(self, field: str, value: Any, gate_attr: str) -> nn.Module | None:
        rebuilt = self._rebuild(field, value)
        if rebuilt is None:
            return None
        gate = getattr(rebuilt, gate_attr, None)
        try:
            gate.load_state_dict(getattr(self.module, gate_attr).state_dict(), strict=True)
        except (RuntimeError, AttributeError):
            return None
        return gate

    def _float_expression(
        self, bound: float, gate_attr: str, chain: list[tuple[str, nn.Linear]], a_name: str, dt_name: str
    ) -> str:
        """``config.<field>`` for the float field the bound follows (rebuilt with it halved)."""
        for name, value in _fields(self.config).items():
            if not isinstance(value, float) or value != bound:
                continue
            gate = self._rebuilt_gate(name, value / 2, gate_attr)
            if gate is not None and _gate_form(gate, chain, a_name, dt_name, self.input) == value / 2:
                return f"config.{name}"
        return repr(bound)

    def _bound_flag(
        self, gate_attr: str, chain: list[tuple[str, nn.Linear]], a_name: str, dt_name: str
    ) -> str:
        """``config.<flag>`` whose other value gives the softplus form, else ``"True"``."""
        for name, value in _fields(self.config).items():
            if not isinstance(value, bool):
                continue
            gate = self._rebuilt_gate(name, not value, gate_attr)
            if gate is not None and _gate_form(gate, chain, a_name, dt_name, self.input) == "softplus":
                return f"config.{name}" if value else f"not config.{name}"
        return "True"

    # ------------------------------------------------------------------------------ config expressions

    def _expressions(
        self, spec: ChannelDeltaSpec, gate_attr: str, gate_chain: list[tuple[str, nn.Linear]], norm_name: str
    ) -> ChannelDeltaSpec:
        heads, head_k, head_v = int(spec.num_heads), int(spec.head_k_dim), int(spec.head_v_dim)

        def sub(m: nn.Module, name: str) -> Any:
            return m.get_submodule(name)

        def rank(chain: tuple[LinearSpec, ...], owner: str) -> tuple[LinearSpec, ...]:
            if len(chain) == 1:
                return chain
            first = chain[0]
            name = f"{owner}.{first.name}" if owner else first.name
            width = self._int_expression(
                int(first.out_width), lambda m: sub(m, name).out_features, f"{name} rank"
            )
            return (
                dataclasses.replace(first, out_width=width),
                dataclasses.replace(chain[1], in_width=width),
            )

        def bias(linear: LinearSpec, owner: str = "") -> LinearSpec:
            return dataclasses.replace(
                linear, bias=self._child_bias(f"{owner}.{linear.name}" if owner else linear.name)
            )

        gate_bias = tuple(bias(linear, gate_attr) for linear in spec.gate_chain)
        return dataclasses.replace(
            spec,
            q=bias(spec.q),
            k=bias(spec.k),
            v=bias(spec.v),
            beta=bias(spec.beta),
            out=bias(spec.out),
            out_gate=rank(tuple(bias(linear) for linear in spec.out_gate), ""),
            gate_chain=rank(gate_bias, gate_attr),
            conv_bias=self._bias(spec.conv),
            conv_activation=self._activation_expression(spec.conv_activation),
            norm_eps=self._eps_expression(norm_name, _eps(getattr(self.module, norm_name))),
            num_heads=self._int_expression(heads, lambda m: sub(m, spec.beta.name).out_features, "heads"),
            head_k_dim=self._int_expression(
                head_k,
                lambda m: getattr(getattr(m, gate_attr), spec.dt_bias).numel(),
                "key head dim",
                scale=heads,
            ),
            head_v_dim=self._int_expression(
                head_v, lambda m: getattr(m, norm_name).weight.numel(), "value head dim"
            ),
            kernel_size=self._int_expression(
                int(spec.kernel_size), lambda m: depthwise_conv(m)[1].kernel_size[0], "conv kernel"
            ),
            hidden_size="config.hidden_size",
        )

    def _child_bias(self, name: str) -> str:
        """``_bias`` for a linear anywhere under the mixer (``forget_gate.f_a_proj``)."""
        has = self.module.get_submodule(name).bias is not None
        for field, value in _fields(self.config).items():
            if not isinstance(value, bool):
                continue
            rebuilt = self._rebuild(field, not value)
            if rebuilt is not None and (rebuilt.get_submodule(name).bias is not None) != has:
                return f"config.{field}" if value == has else f"not config.{field}"
        return repr(has)


def _gate_form(
    gate: nn.Module, chain: list[tuple[str, nn.Linear]], a_name: str, dt_name: str, x: torch.Tensor
) -> str | float | None:
    """``"softplus"``, the lower bound (a float) of the bounded sigmoid form, or None: the forget gate
    child's output on ``x`` against each form computed from its own weights."""
    probe = copy.deepcopy(gate).float().eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in probe.parameters(recurse=False):  # rates near 1, biases that reach both tails
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        out = probe(x).float()
        f = x
        for name, _ in chain:
            f = getattr(probe, name)(f)
        a_log, dt_bias = getattr(probe, a_name), getattr(probe, dt_name)
        heads = a_log.numel()
        f = f.float().reshape(*x.shape[:2], heads, -1) + dt_bias.float().reshape(heads, -1)
        rate = a_log.float().exp().reshape(heads, 1)
    if out.shape != f.shape:
        return None
    softplus = -rate * F.softplus(f)
    if _relative(softplus, out) < _FIT_TOL:
        return "softplus"
    sigmoid = torch.sigmoid(rate * f)
    bound = float((out * sigmoid).sum() / (sigmoid * sigmoid).sum())
    if _relative(bound * sigmoid, out) < _FIT_TOL:
        return round(bound, 6)
    return None


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp_min(1e-12))
