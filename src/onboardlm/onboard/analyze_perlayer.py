"""Per-layer inputs, measured: decoder layers that take a vector of their own per token (Gemma 4).

A decoder layer whose forward takes a tensor beside the hidden states (``per_layer_input``), which
the model computes for every layer, is measured here before the rest of the analysis:

- one recorded forward of the tiny model gives each layer's per-layer input ``[B, S, width]`` and the
  outputs of the modules of the layer stack that compute it: a second token embedding of
  ``num_hidden_layers * width`` columns (its rows scaled), a linear of the input embeddings to as many
  columns (its output scaled, then normalised over each layer's ``width`` channels), and the sum of
  the two, scaled. Each scale is matched to a config expression and every layer's input is checked.
- a copy of the first layer, replayed on its recorded call with its own tensors (an output scale)
  set to a telling value, shows where the layer mixes the input in: its gate linear takes the hidden
  state the layer computes after attention and feed-forward (the layer's output, before its own
  scale, with the mixing zeroed), and the layer returns ``(h + norm(up(act(gate(h)) * input))) * s``.
- the config field of ``width`` is the one whose 0 rebuilds the model without exactly these modules;
  the rest of the model is then measured on that config (the layer without the per-layer block is an
  ordinary decoder layer), and the generated file keeps both ways.

Where any of this does not hold (Gemma 3n mixes the input into one of several AltUp streams), the
model is left to the ordinary analysis, which names what it does not support.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.spec_perlayer import PerLayerInputSpec
from onboardlm.testing.capture import record_calls

if TYPE_CHECKING:
    from onboardlm.onboard.spec import ArchitectureSpec

__all__ = ["kv_sharing_refusals", "layer_extra_inputs", "measure_per_layer_inputs", "with_per_layer_inputs"]

_HINT = "a template for per-layer inputs mixed in this way"

#: Layer parameters that are not an input of the layer's own (the usual arguments of a decoder layer).
_STANDARD = {
    "hidden_states",
    "attention_mask",
    "position_ids",
    "position_embeddings",
    "cache",
    "use_cache",
    "cache_position",
    "output_attentions",
}
#: Combining scales that are constants of the architecture, (expression, value).
_CONSTANTS = [(None, 1.0), ("2**-0.5", 2**-0.5), ("0.5", 0.5), ("2**0.5", 2**0.5)]
_SEQ = 6


def layer_extra_inputs(layer: nn.Module) -> list[str]:
    """The parameters of ``layer.forward`` beside the hidden states that are none of the usual ones
    (masks, positions, caches) nor stores shared between layers (annotated dicts)."""
    found = []
    for parameter in list(inspect.signature(layer.forward).parameters.values())[1:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.name in _STANDARD or "past_key" in parameter.name:
            continue
        if "dict" in str(parameter.annotation).lower() or "Dict" in str(parameter.annotation):
            continue  # a store shared between layers (Gemma 4's shared_kv_states)
        found.append(parameter.name)
    return found


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def _ratio(actual: torch.Tensor, base: torch.Tensor) -> float | None:
    """The scalar ``c`` with ``actual == c * base`` (least squares), None where there is none."""
    if actual.shape != base.shape or not float((base * base).sum()):
        return None
    value = float((actual * base).sum() / (base * base).sum())
    return value if _close(actual, value * base) else None


def _match(value: float | None, candidates: list[tuple[str | None, float]]) -> str | None | bool:
    """The first candidate expression whose value is ``value`` (None is the expression of 1), or
    False where none is."""
    if value is None:
        return False
    for expression, candidate in candidates:
        if abs(candidate - value) <= 1e-5 * max(1.0, abs(candidate)):
            return expression
    return False


def _power_candidates(tiny: PretrainedConfig, fields: list[str]) -> list[tuple[str | None, float]]:
    found: list[tuple[str | None, float]] = [(None, 1.0)]
    for name in fields:
        value = getattr(tiny, name)
        found += [(f"config.{name}**0.5", value**0.5), (f"config.{name}**-0.5", value**-0.5)]
    return found


def _stack(model: nn.Module, layers: int) -> tuple[str, nn.Module, str, nn.ModuleList] | None:
    """(path, module) of the module holding the decoder layers, and (attribute, list) of the layers."""
    for path, module in model.named_modules():
        for name, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == layers:
                return path, module, name, child
    return None


def _int_fields(tiny: PretrainedConfig, value: int) -> list[str]:
    fields = {**tiny.to_dict(), **{k: v for k, v in vars(tiny).items() if not k.startswith("_")}}
    return [
        name
        for name, field_value in fields.items()
        if isinstance(field_value, int) and not isinstance(field_value, bool) and field_value == value
    ]


def _flipped(tiny: PretrainedConfig, name: str, value: Any) -> PretrainedConfig | None:
    config = copy.deepcopy(tiny)
    try:
        setattr(config, name, value)
    except Exception:  # noqa: BLE001 - a value the config refuses tells nothing
        return None
    return config


def _state_keys(model: nn.Module, config: PretrainedConfig) -> set[str] | None:
    try:
        rebuilt = type(model)(config)
    except Exception:  # noqa: BLE001 - a config the model cannot take tells nothing
        return None
    return set(rebuilt.state_dict())


def measure_per_layer_inputs(
    tiny: PretrainedConfig, model: nn.Module
) -> tuple[PerLayerInputSpec, PretrainedConfig] | None:
    """The per-layer inputs of ``model`` (built on ``tiny``) and the config without them, or None where
    its layers take no such input or take it otherwise than measured here."""
    layers_count = getattr(tiny, "num_hidden_layers", None)
    if not isinstance(layers_count, int) or layers_count < 1:
        return None
    found = _stack(model, layers_count)
    if found is None:
        return None
    extra = layer_extra_inputs(found[3][0])
    if len(extra) != 1:
        return None
    try:
        with torch.random.fork_rng():  # the rebuilt modules leave the analysis' random state alone
            return _Measurement(tiny, model, *found, extra[0]).run()
    except Exception:  # noqa: BLE001 - not per-layer inputs as measured here: the ordinary analysis names it
        return None


def with_per_layer_inputs(spec: ArchitectureSpec, per_layer: PerLayerInputSpec) -> ArchitectureSpec:
    """``spec`` (measured on the config without per-layer inputs) with them."""
    where = f"{spec.stack_path}.{spec.layers_attr}.0"
    if spec.hybrid is not None:
        raise UnsupportedFeature(where, "per-layer inputs in a hybrid stack (layers of several kinds)", _HINT)
    if per_layer.table_class is not None and per_layer.table_class != spec.embedding.scaled_class:
        raise UnsupportedFeature(
            f"{spec.stack_path}.{per_layer.table}",
            f"per-layer embedding table of class {per_layer.table_class}, not the token embeddings' class",
            _HINT,
        )
    note = (
        f"per-layer inputs: every decoder layer mixes in its own config.{per_layer.width} channels per"
        f" token ({per_layer.table} rows and {per_layer.projection} of the input embeddings)"
    )
    return dataclasses.replace(spec, per_layer_input=per_layer, notes=(*spec.notes, note))


class _NoMatch(Exception):
    """The model computes or mixes its per-layer inputs otherwise than measured here."""


class _Measurement:
    def __init__(
        self,
        tiny: PretrainedConfig,
        model: nn.Module,
        stack_path: str,
        stack: nn.Module,
        layers_attr: str,
        layers: nn.ModuleList,
        argument: str,
    ) -> None:
        self.tiny, self.model, self.stack, self.layers = tiny, model, stack, layers
        self.stack_path, self.layers_attr, self.argument = stack_path, layers_attr, argument
        self.hidden = tiny.hidden_size
        self.prefix = f"{stack_path}." if stack_path else ""

    def run(self) -> tuple[PerLayerInputSpec, PretrainedConfig]:
        calls = self._record()
        inputs = [self._argument(calls[self._layer_path(i)][0]) for i in range(len(self.layers))]
        if not all(isinstance(value, torch.Tensor) and value.is_floating_point() for value in inputs):
            raise _NoMatch
        width = inputs[0].shape[-1]
        if any(value.shape != (2, _SEQ, width) for value in inputs):
            raise _NoMatch
        model_level = self._model_level(calls, inputs, width)
        layer_level = self._layer_level(calls[self._layer_path(0)][0], width)
        model_norm = self.stack.get_submodule(model_level["projection_norm"])
        layer_norm = self.layers[0].get_submodule(layer_level["norm"])
        if type(model_norm) is not type(layer_norm) or _eps(model_norm) != _eps(layer_norm):
            raise _NoMatch  # the lean file builds both from the layers' norm class
        field, stripped = self._width_field(width, model_level, layer_level)
        candidates = _power_candidates(self.tiny, ["hidden_size", field])  # not another field of that value
        for scale in ("table_scale", "projection_scale"):
            model_level[scale] = _match(model_level[scale], candidates)
            if model_level[scale] is False:
                raise _NoMatch
        return (
            PerLayerInputSpec(
                argument=self.argument,
                width=field,
                num_layers=len(self.layers),
                **model_level,
                **layer_level,
            ),
            stripped,
        )

    # ------------------------------------------------------------------------------------- record

    def _layer_path(self, index: int) -> str:
        return f"{self.prefix}{self.layers_attr}.{index}"

    def _record(self) -> dict[str, list[Any]]:
        children = [
            f"{self.prefix}{name}" for name, _ in self.stack.named_children() if name != self.layers_attr
        ]
        layers = [self._layer_path(i) for i in range(len(self.layers))]
        input_ids = torch.arange(2 * _SEQ).reshape(2, _SEQ) % (self.tiny.vocab_size - 1) + 1
        self.input_ids = input_ids
        return record_calls(
            self.model,
            [*layers, *children],
            input_ids=input_ids,
            position_ids=torch.arange(_SEQ)[None].expand(2, _SEQ),
            use_cache=False,
        )

    def _argument(self, call: Any) -> Any:
        bound = inspect.signature(self.layers[0].forward).bind_partial(*call.args, **call.kwargs)
        return bound.arguments.get(self.argument)

    # -------------------------------------------------------------------------------- model level

    def _model_level(
        self, calls: dict[str, list[Any]], inputs: list[torch.Tensor], width: int
    ) -> dict[str, Any]:
        count = len(self.layers)
        packed = count * width
        tokens = self.model.get_input_embeddings()
        children = dict(self.stack.named_children())
        tables = [
            n
            for n, c in children.items()
            if isinstance(c, nn.Embedding) and c is not tokens and c.embedding_dim == packed
        ]
        projections = [
            n
            for n, c in children.items()
            if isinstance(c, nn.Linear) and c.in_features == self.hidden and c.out_features == packed
        ]
        norms = [
            n
            for n, c in children.items()
            if not list(c.children())
            and [tuple(p.shape) for p in c.parameters()] in ([(width,)], [(width,), (width,)])
        ]
        if len(tables) != 1 or len(projections) != 1 or len(norms) != 1:
            raise _NoMatch
        table, projection, norm = tables[0], projections[0], norms[0]
        if children[projection].bias is not None:
            raise _NoMatch
        (table_call,) = calls[f"{self.prefix}{table}"]
        (projection_call,) = calls[f"{self.prefix}{projection}"]
        (norm_call,) = calls[f"{self.prefix}{norm}"]
        token_calls = [
            call
            for path, found in calls.items()
            for call in found
            if self.model.get_submodule(path) is tokens
        ]
        if len(token_calls) != 1 or not _close(projection_call.hidden_states, token_calls[0].result):
            raise _NoMatch  # the projection takes the input embeddings as the token embedding gives them
        raw = children[table].weight.detach()[self.input_ids]
        table_scale = _ratio(table_call.result, raw)  # matched to config expressions with the width field
        shape = (2, _SEQ, count, width)
        projection_scale = _ratio(
            norm_call.hidden_states.reshape(shape), projection_call.result.reshape(shape)
        )
        if table_scale is None or projection_scale is None:
            raise _NoMatch
        total = norm_call.result.reshape(shape) + table_call.result.reshape(shape)
        combined = torch.stack(inputs, dim=2)
        combine_scale = _match(_ratio(combined, total), _CONSTANTS)
        if combine_scale is False:
            raise _NoMatch
        table_module = children[table]
        if type(table_module) is not nn.Embedding and type(table_module) is not type(tokens):
            raise _NoMatch  # a table class of its own
        rows = self._rows_field(table, table_module.num_embeddings)
        return {
            "rows": rows,
            "table": table,
            "table_scale": table_scale,
            "table_class": None if type(table_module) is nn.Embedding else type(table_module).__name__,
            "projection": projection,
            "projection_scale": projection_scale,
            "projection_norm": norm,
            "combine_scale": combine_scale,
        }

    def _rows_field(self, table: str, rows: int) -> str:
        """The config field of the table's rows: of the fields of that value, the one that moves them
        on a rebuilt model (the tiny config may give the vocabulary and the table one size)."""
        for name in sorted(_int_fields(self.tiny, rows), key=lambda n: n == "vocab_size"):
            config = _flipped(self.tiny, name, rows + 7)
            try:
                rebuilt = type(self.stack)(config) if config is not None else None
            except Exception:  # noqa: BLE001 - a config the model cannot take tells nothing
                continue
            if rebuilt is not None and getattr(rebuilt, table).num_embeddings == rows + 7:
                return f"config.{name}"
        raise _NoMatch

    # -------------------------------------------------------------------------------- layer level

    def _layer_level(self, call: Any, width: int) -> dict[str, Any]:
        layer = self.layers[0]
        children = dict(layer.named_children())
        gates = [
            n
            for n, c in children.items()
            if isinstance(c, nn.Linear) and (c.in_features, c.out_features) == (self.hidden, width)
        ]
        ups = [
            n
            for n, c in children.items()
            if isinstance(c, nn.Linear) and (c.in_features, c.out_features) == (width, self.hidden)
        ]
        if len(gates) != 1 or len(ups) != 1 or any(children[n].bias is not None for n in (*gates, *ups)):
            raise _NoMatch
        gate, up = gates[0], ups[0]
        probe = copy.deepcopy(layer).eval()
        own = [*probe.parameters(recurse=False), *probe.buffers(recurse=False)]
        seen: dict[str, tuple[Any, Any]] = {}

        def record(name: str) -> Any:
            def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                value = args[0] if args else kwargs.get("hidden_states")
                seen.setdefault(name, (value, output))

            return hook

        hooks = [
            getattr(probe, name).register_forward_hook(record(name), with_kwargs=True) for name in children
        ]
        try:
            with torch.no_grad():
                for tensor in own:  # an output scale of the layer's own shows where the input joins
                    if tensor.is_floating_point():
                        tensor.fill_(1.7)
                output = _first(probe(*call.args, **call.kwargs))
                full = dict(seen)
                seen.clear()
                getattr(probe, up).weight.zero_()  # no per-layer input mixed in
                zeroed = _first(probe(*call.args, **call.kwargs))
        finally:
            for hook in hooks:
                hook.remove()
        if gate not in full or up not in full or gate not in seen:
            raise _NoMatch
        hidden_in = full[gate][0]  # what the gate takes: the hidden state after the blocks
        scale = _ratio(zeroed, seen[gate][0])  # the layer's output is that state times its own scale
        if scale is None or not _close(seen[gate][0], hidden_in):
            raise _NoMatch
        up_out, gate_out = full[up][1], full[gate][1]
        norms = [n for n, (x, _) in full.items() if n not in (gate, up) and x is up_out]
        acts = [
            n
            for n, (x, _) in full.items()
            if n not in (gate, up)
            and not list(children[n].parameters())
            and isinstance(x, torch.Tensor)
            and _close(x, gate_out)
        ]
        if len(norms) != 1 or len(acts) != 1:
            raise _NoMatch
        norm, act_attr = norms[0], acts[0]
        if not self._same_norm(layer, children[norm], {gate, up, norm, act_attr}):
            raise _NoMatch
        per_layer_input = self._argument(call)
        for name in self._activation_fields():
            act = ACT2FN[getattr(self.tiny, name)]
            with torch.no_grad():
                block = children[norm](children[up](act(children[gate](hidden_in)) * per_layer_input))
            if _close(output, (hidden_in + block) * scale):
                return {"gate": gate, "up": up, "norm": norm, "act_attr": act_attr, "act": f"config.{name}"}
        raise _NoMatch

    def _activation_fields(self) -> list[str]:
        fields = {**self.tiny.to_dict()}
        return [n for n, v in fields.items() if isinstance(v, str) and v in ACT2FN and "act" in n]

    @staticmethod
    def _same_norm(layer: nn.Module, norm: nn.Module, block: set[str]) -> bool:
        """The block's norm is of the class (and epsilon) of another norm of the layer's own."""
        others = [
            child
            for name, child in layer.named_children()
            if name not in block and type(child) is type(norm) and child is not norm
        ]
        return any(_eps(other) == _eps(norm) for other in others)

    # --------------------------------------------------------------------------------- the field

    def _width_field(
        self, width: int, model_level: dict[str, Any], layer_level: dict[str, Any]
    ) -> tuple[str, PretrainedConfig]:
        """The int config field of ``width`` whose 0 rebuilds the model without exactly the measured
        modules (and that config)."""
        keys = set(self.model.state_dict())
        stack_prefix = self.prefix
        dropped = {
            key
            for key in keys
            for name in (model_level["table"], model_level["projection"], model_level["projection_norm"])
            if key.startswith(f"{stack_prefix}{name}.")
        }
        for index in range(len(self.layers)):
            layer_prefix = f"{self._layer_path(index)}."
            dropped |= {
                key
                for key in keys
                for name in (layer_level["gate"], layer_level["up"], layer_level["norm"])
                if key.startswith(f"{layer_prefix}{name}.")
            }
        for name in _int_fields(self.tiny, width):
            config = _flipped(self.tiny, name, 0)
            if config is not None and _state_keys(self.model, config) == keys - dropped:
                return name, config
        raise _NoMatch


def _first(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise _NoMatch


def _eps(norm: nn.Module) -> Any:
    return getattr(norm, "eps", getattr(norm, "variance_epsilon", None))


def kv_sharing_refusals(
    tiny: PretrainedConfig, model: nn.Module, attn_attr: str
) -> tuple[tuple[str, str], ...]:
    """Int config fields at 0 in ``tiny`` that, set to the depth of ``tiny`` on a copy twice as deep
    (its layer types repeated), rebuild decoder layers whose attention has fewer weights (Gemma 4's
    ``num_kv_shared_layers``: the last layers read the keys and values of an earlier layer, their own
    k/v projections are left out). The lean file computes keys and values on every layer, so it
    refuses such a config, as ``(condition, setting)`` pairs of ``DecoderLayerSpec.refused``, instead
    of loading the projections the checkpoint keeps for nothing."""
    depth = getattr(tiny, "num_hidden_layers", None)
    found = _stack(model, depth) if isinstance(depth, int) and depth > 0 else None
    if found is None:
        return ()
    prefix = f"{found[0]}.{found[2]}." if found[0] else f"{found[2]}."

    def attention_keys(config: PretrainedConfig | None) -> set[str] | None:
        if config is None:
            return None
        try:
            with torch.device("meta"):
                rebuilt = type(model)(config)
        except Exception:  # noqa: BLE001 - a value the model cannot take tells nothing
            return None
        return {k for k in rebuilt.state_dict() if k.startswith(prefix) and f".{attn_attr}." in k}

    base = attention_keys(deeper := _deeper(tiny, depth))
    refused = []
    for name in _int_fields(tiny, 0) if base else ():
        keys = attention_keys(_flipped(deeper, name, depth))
        if keys is not None and keys < base:
            refused.append((f"config.{name}", f"config.{name}>0 (KV sharing)"))
    return tuple(refused)


def _deeper(tiny: PretrainedConfig, depth: int) -> PretrainedConfig | None:
    """``tiny`` with its layers twice over: layer types and per-layer overrides repeated."""
    values = tiny.to_dict()
    values["num_hidden_layers"] = 2 * depth
    if isinstance(values.get("layer_types"), list) and len(values["layer_types"]) == depth:
        values["layer_types"] = values["layer_types"] * 2
    overrides = values.get("per_layer_config")
    if isinstance(overrides, dict):
        values["per_layer_config"] = {
            **overrides,
            **{str(int(k) + depth): v for k, v in overrides.items() if str(k).isdigit()},
        }
    try:
        return type(tiny).from_dict(values)
    except Exception:  # noqa: BLE001 - a config that cannot be deepened tells nothing
        return None
