"""Cross-layer KV sharing: attention layers that read the keys and values of an earlier layer.

Gemma 3n / Gemma 4 (``num_kv_shared_layers``) and Kolibri 1.1 (``kv_source_layers``) build some
attention layers without key/value projections: they attend with their own queries to the keys and
values another layer computed (after its norms and RoPE). Which layer each one reads is measured, not
read from config fields: one forward of the model runs an attention function that records the key and
value tensors every attention call receives; a layer without key/value projections reads the keys and
values of the earlier layer whose recorded tensors are equal (random weights make every producing
layer's keys distinct). A config expression over ``layer_idx`` is then chosen among a few rules only
where it reproduces the measured sources exactly (a list field of the sources, or a count of trailing
sharing layers that read the last producing layer of their own layer type), so that the generated file
follows any config of the family.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = ["KVSharing", "kv_source_expression", "measure_kv_sources"]

_PROBE = "onboardlm_kv_probe"


@dataclass(frozen=True)
class KVSharing:
    """Measured sharing: the source layer of every layer (itself where it computes its own keys and
    values) and the config expression over ``layer_idx`` that gives it."""

    sources: tuple[int, ...]
    expression: str


def measure_kv_sources(model: nn.Module, attention_paths: list[str], vocab_size: int) -> list[int] | None:
    """For each attention module (``attention_paths`` in layer order) the index of the layer whose keys
    and values it attends to, from one recorded forward; None where a layer's keys and values equal no
    single earlier layer's (or the attention calls no attention function)."""
    modules = [model.get_submodule(path) for path in attention_paths]
    records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def probe(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        records.setdefault(id(module), (key.detach().clone(), value.detach().clone()))
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, *args, **kwargs)

    AttentionInterface.register(_PROBE, probe)
    AttentionMaskInterface.register(_PROBE, sdpa_mask)
    config = model.config
    saved = config._attn_implementation
    try:
        config._attn_implementation = _PROBE
        input_ids = (torch.arange(14).reshape(2, 7) * 5) % (vocab_size - 1) + 1
        with torch.no_grad():
            model(input_ids=input_ids, position_ids=torch.arange(7)[None].expand(2, 7), use_cache=False)
    finally:
        config._attn_implementation = saved
    if any(id(module) not in records for module in modules):
        return None
    kv = [records[id(module)] for module in modules]
    sources = []
    for index, (key, value) in enumerate(kv):
        equal = [
            i
            for i in range(index)
            if kv[i][0].shape == key.shape and torch.equal(kv[i][0], key) and torch.equal(kv[i][1], value)
        ]
        # a layer reading an earlier layer's tensors: the first with them is the one that made them
        sources.append(equal[0] if equal else index)
    return sources


def _candidates(config: Any) -> list[tuple[str, str | None]]:
    """(expression over ``layer_idx``, count field it reads or None) that may give a layer's source."""
    fields = {k: v for k, v in vars(config).items() if not k.startswith("_")}
    layers = fields.get("num_hidden_layers")
    found: list[tuple[str, str | None]] = [
        (f"config.{name}[layer_idx]", None)
        for name, value in fields.items()
        if isinstance(value, (list, tuple)) and len(value) == layers and all(type(v) is int for v in value)
    ]
    if isinstance(fields.get("layer_types"), (list, tuple)):
        for name, value in fields.items():
            if type(value) is int and 0 < value < layers and name != "num_hidden_layers":
                first = f"config.num_hidden_layers - config.{name}"
                expression = (
                    f"layer_idx if layer_idx < {first} else max(i for i in range({first})"
                    " if config.layer_types[i] == config.layer_types[layer_idx])"
                )
                found.append((expression, name))
    return found


def _evaluate(expression: str, config: Any, layers: int) -> list[Any] | None:
    scope = {"config": config, "max": max, "range": range, "__builtins__": {}}
    try:
        return [eval(expression, {**scope, "layer_idx": i}) for i in range(layers)]  # noqa: S307
    except Exception:  # noqa: BLE001 - a candidate this config cannot evaluate
        return None


def kv_source_expression(
    config: Any, sources: list[int], measure: Callable[[Any], list[int] | None]
) -> str | None:
    """The first candidate expression that gives every layer's measured source on ``config``. A rule
    over a count field must also give the sources ``measure`` finds on a copy of ``config`` with that
    count one lower (a count that only happens to equal the number of sharing layers, an EOS
    token id say, moves no layer)."""
    for expression, count in _candidates(config):
        if _evaluate(expression, config, len(sources)) != list(sources):
            continue
        if count is not None:
            variant = copy.deepcopy(config)
            setattr(variant, count, getattr(config, count) - 1)  # one sharing layer fewer
            try:
                measured = measure(variant)
            except Exception:  # noqa: BLE001, S112 - transformers refuses that count: no evidence
                continue
            if measured is None or _evaluate(expression, variant, len(sources)) != measured:
                continue
        return expression
    return None
