"""Measure Griffin's recurrent block (RecurrentGemma's RG-LRU temporal block).

Recognised by ``analyze_hybrid._is_rg_lru`` (a depthwise conv beside a child holding square
block-diagonal gate weights ``[H, D, D]`` and a per-channel recurrence parameter). Read from the
module, never from names:

* widths from the weights: the conv's channels are the recurrence width, the gate weights' first dim
  its heads; two linear maps take the hidden states to that width, one maps it back;
* which in-map is the activated gate branch and which feeds the conv, which gate weight and bias
  gate the input and which the recurrence, and the gate branch's activation are fitted: each
  candidate is emitted, loaded with the module's weights (``strict``) and run on the probe input
  (positions from 0, no cache); the first that reproduces the module's output is kept;
* config expressions are confirmed by rebuilding the block with the field changed.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PretrainedConfig

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.analyze_mixers import _Probe, depthwise_conv
from onboardlm.onboard.spec_mixers import LinearSpec, RgLruSpec

_HINT = "teach onboardlm/onboard/analyze_rg_lru.py this form of Griffin's recurrent block"


def analyze_rg_lru(config: PretrainedConfig, module: nn.Module, path: str, layer_idx: int) -> RgLruSpec:
    return _RgLruProbe(config, module, path, layer_idx).spec(path.rsplit(".", 1)[-1])


def _lru_child(module: nn.Module) -> tuple[str, nn.Module] | None:
    for name, child in module.named_children():
        own = list(child.parameters(recurse=False))
        if sum(p.dim() == 3 and p.shape[-1] == p.shape[-2] for p in own) == 2:
            return name, child
    return None


class _RgLruProbe(_Probe):
    def __init__(self, config: PretrainedConfig, module: nn.Module, path: str, layer_idx: int) -> None:
        self.config, self.module, self.path, self.layer_idx = config, module, path, layer_idx
        self.hidden = config.hidden_size
        generator = torch.Generator().manual_seed(0)
        self.input = torch.randn(2, 9, self.hidden, generator=generator)
        positions = torch.arange(9)[None].expand(2, -1)
        with torch.no_grad():
            out = module(self.input, positions, None, use_cache=False)
        self.expected = out[0] if isinstance(out, (tuple, list)) else out

    def spec(self, attr: str) -> RgLruSpec:
        module, path, hidden = self.module, self.path, self.hidden
        conv_name, conv = depthwise_conv(module)
        width = conv.in_channels
        found = _lru_child(module)
        if found is None:
            raise UnsupportedFeature(path, "recurrent block without an RG-LRU child", _HINT)
        lru_attr, lru = found
        own = list(lru.named_parameters(recurse=False))
        weights = [n for n, p in own if p.dim() == 3]
        heads = lru.get_parameter(weights[0]).shape[0]
        biases = [n for n, p in own if tuple(p.shape) == (heads, width // heads)]
        params = [n for n, p in own if tuple(p.shape) == (width,)]
        linears = {n: c for n, c in module.named_children() if isinstance(c, nn.Linear)}
        # (gate, value, out) assignments the shapes allow (hidden size and width may be equal)
        roles = [
            (gate, value, out)
            for gate, value, out in itertools.permutations(linears, 3)
            if all(
                linears[n].in_features == hidden and linears[n].out_features == width for n in (gate, value)
            )
            and linears[out].in_features == width
            and linears[out].out_features == hidden
        ]
        if len(biases) != 2 or len(params) != 1 or not roles or len(linears) != 3:
            raise UnsupportedFeature(
                path,
                "recurrent block without two in-maps to the recurrence width, one out-map, two gate biases"
                " [H, D] and one recurrence parameter [C]",
                _HINT,
            )

        def linear(name: str, in_width: str, out_width: str) -> LinearSpec:
            bias = "True" if getattr(module, name).bias is not None else "False"
            return LinearSpec(name, bias, in_width, out_width)

        def candidates() -> Iterator[RgLruSpec]:
            for (gate, value, out), (w_i, w_a), (b_i, b_a), act in itertools.product(
                roles, (weights, weights[::-1]), (biases, biases[::-1]), self._activations()
            ):
                yield RgLruSpec(
                    class_name=type(module).__name__,
                    attr=attr,
                    gate=linear(gate, "hidden_size", "self.width"),
                    value=linear(value, "hidden_size", "self.width"),
                    activation=repr(act),
                    conv=conv_name,
                    conv_bias="True" if conv.bias is not None else "False",
                    out=linear(out, "self.width", "hidden_size"),
                    lru_attr=lru_attr,
                    lru_class=type(lru).__name__,
                    recurrent_param=params[0],
                    input_gate_weight=w_i,
                    input_gate_bias=b_i,
                    recurrent_gate_weight=w_a,
                    recurrent_gate_bias=b_a,
                    lru_children=tuple(n for n, _ in own),
                    width=str(width),
                    heads=str(heads),
                    kernel_size=str(conv.kernel_size[0]),
                    hidden_size=str(hidden),
                )

        varied = "which linear map is the gate branch, the conv input and the output, input / recurrence gate roles, gate activation"
        spec = self._fit(candidates(), "RG-LRU recurrent block", varied)
        return dataclasses.replace(
            spec,
            gate=dataclasses.replace(spec.gate, bias=self._bias(spec.gate.name)),
            value=dataclasses.replace(spec.value, bias=self._bias(spec.value.name)),
            out=dataclasses.replace(spec.out, bias=self._bias(spec.out.name)),
            activation=self._activation_expression(spec.activation),
            conv_bias=self._bias(conv_name),
            width=self._int_expression(width, lambda m: depthwise_conv(m)[1].in_channels, "recurrence width"),
            heads=self._int_expression(
                heads,
                lambda m: getattr(m, lru_attr).get_parameter(weights[0]).shape[0],
                "RG-LRU gate blocks",
            ),
            kernel_size=self._int_expression(
                conv.kernel_size[0], lambda m: depthwise_conv(m)[1].kernel_size[0], "conv kernel"
            ),
            hidden_size="config.hidden_size",
        )
