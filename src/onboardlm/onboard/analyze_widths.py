"""Decoder layers of different widths: transformers' ``per_layer_config`` (heterogeneous configs).

A config with ``per_layer_config`` overrides some fields on some layers (Gemma 4: ``head_dim`` and
``num_key_value_heads`` on its full-attention layers). The analyzer measures the first layer as
usual, reading the global values (the first layer's own: a config whose first layer is overridden is
refused); this module then measures every layer's attention shape against its own layer config, so
that the generated attention reads exactly the overridden fields from
``config.per_layer_config[layer_idx]`` and the rotary tables of a layer type from
``config.per_layer_config[layer_type]``. A field the templates read elsewhere (an MLP width, an
expert count) is refused by name.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.spec import AttentionSpec

__all__ = [
    "ATTENTION_WIDTH_FIELDS",
    "check_first_layer",
    "global_access",
    "layer_type_config",
    "overridden_fields",
    "per_layer_attention_fields",
]

#: Fields the attention template reads per layer when ``per_layer_config`` overrides them.
ATTENTION_WIDTH_FIELDS = ("head_dim", "num_key_value_heads", "num_attention_heads")
_HINT = "a template reading these fields per layer; analyze_widths.py measures attention widths only"


def overridden_fields(config: PretrainedConfig) -> tuple[str, ...]:
    """The fields ``per_layer_config`` overrides on some layer (sorted), () for a homogeneous config."""
    if not getattr(config, "is_heterogeneous", False):
        return ()
    overrides = config._heterogeneity_spec.per_layer_overrides
    return tuple(sorted({name for fields in overrides.values() for name in fields if name != "skip"}))


def _first_layer_overrides(config: PretrainedConfig) -> dict[str, Any]:
    return dict(config._heterogeneity_spec.per_layer_overrides.get(0, {}))


@contextlib.contextmanager
def global_access(*configs: PretrainedConfig) -> Iterator[None]:
    """Let the analyzer read the global value of a per-layer field on heterogeneous ``configs`` (the
    first layer's, which ``check_first_layer`` makes sure of) for the duration, without transformers'
    warning; restored afterwards."""
    heterogeneous = [c for c in configs if getattr(c, "is_heterogeneous", False)]
    saved = [c.allow_global_per_layer_attribute_access for c in heterogeneous]
    log = logging.getLogger("transformers.integrations.heterogeneity.configuration_utils")
    level = log.level
    for config in heterogeneous:
        config.allow_global_per_layer_attribute_access = True
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
        for config, value in zip(heterogeneous, saved, strict=True):
            config.allow_global_per_layer_attribute_access = value


def check_first_layer(config: PretrainedConfig) -> None:
    """Refuse a config whose first layer is overridden (the probes measure layer 0 on global values)."""
    first = _first_layer_overrides(config)
    if first:
        raise UnsupportedFeature(
            f"{type(config).__name__}.per_layer_config",
            f"decoder layers of different widths: per_layer_config overrides {', '.join(sorted(first))} on"
            " the first layer, which the analyzer measures with the global values",
            _HINT,
        )


def layer_type_config(config: PretrainedConfig, layer_type: str | None) -> PretrainedConfig:
    """The config of the layers of ``layer_type`` (all with the same overrides), else ``config``."""
    if layer_type is None or not getattr(config, "is_heterogeneous", False):
        return config
    return config.per_layer_config[layer_type]


def _expected_widths(spec: AttentionSpec, config: PretrainedConfig, hidden: int) -> dict[str, int]:
    """Output widths of the q/k/v projections and input width of the output projection that the
    attention template builds from one layer's ``config``."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_expression = spec.kv_heads.replace("config.", "layer_config.")
    kv_heads = eval(kv_expression, {}, {"layer_config": config})  # noqa: S307 (the analyzer's own expression)
    q_width = (2 if spec.output_gate == "per_head" else 1) * heads * head_dim
    q, k, v = (p.name for p in spec.projections)
    return {q: q_width, k: kv_heads * head_dim, v: kv_heads * head_dim, spec.out.name: heads * head_dim}


def per_layer_attention_fields(
    config: PretrainedConfig, spec: AttentionSpec, layers: nn.ModuleList, layers_path: str, hidden: int
) -> tuple[str, ...]:
    """The overridden fields the attention reads per layer, after checking every layer's projection
    widths (and per-head norm widths) against its own layer config; a width no layer config explains,
    or an overridden field that is no attention width, is refused naming the layer."""
    fields = overridden_fields(config)
    if not fields:
        return ()
    others = [name for name in fields if name not in ATTENTION_WIDTH_FIELDS]
    if others:
        raise UnsupportedFeature(
            f"{type(config).__name__}.per_layer_config",
            f"decoder layers of different widths: per_layer_config overrides {', '.join(others)} on some"
            " layers, which the templates read once for all layers",
            _HINT,
        )
    if spec.fused_qkv or spec.inner_attr or spec.differential:
        raise UnsupportedFeature(
            f"{layers_path}.0.{spec.attr}",
            "per-layer attention widths with a fused q/k/v projection, a wrapped or a differential attention",
            _HINT,
        )
    for index, layer in enumerate(layers):
        attn = getattr(layer, spec.attr)
        layer_config = config.per_layer_config[index]
        expected = _expected_widths(spec, layer_config, hidden)
        for name, width in expected.items():
            linear = getattr(attn, name, None)
            if linear is None and name in spec.kv_own:  # a layer reading another layer's keys and values
                continue
            if not isinstance(linear, nn.Linear):
                raise UnsupportedFeature(
                    f"{layers_path}.{index}.{spec.attr}.{name}",
                    f"layer {index} has no {name} (per-layer attention modules)",
                    _HINT,
                )
            actual = linear.in_features if name == spec.out.name else linear.out_features
            if actual != width:
                raise UnsupportedFeature(
                    f"{layers_path}.{index}.{spec.attr}.{name}",
                    f"width {actual} on layer {index}, where its per_layer_config gives {width}",
                    _HINT,
                )
        head_dim = getattr(layer_config, "head_dim", None) or hidden // layer_config.num_attention_heads
        for name in spec.qk_norm_names if spec.qk_norm is not None and spec.qk_norm_per_head else ():
            weight = getattr(getattr(attn, name, None), "weight", None)
            if weight is not None and weight.shape[-1] != head_dim:
                raise UnsupportedFeature(
                    f"{layers_path}.{index}.{spec.attr}.{name}",
                    f"norm over {weight.shape[-1]} channels on layer {index}, not its head_dim {head_dim}",
                    _HINT,
                )
    return fields
