"""Default configs completed as a checkpoint's config.json would be.

A bare ``model_type`` onboards transformers' default config. A few defaults leave fields unset that
every real checkpoint of the family sets (``head_dim`` or ``num_key_value_heads`` None, MoE routing
counts None), and transformers then cannot build or run the model. :func:`complete_default_config`
fills them, by field name and never by ``model_type``, and says what it filled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from transformers import PretrainedConfig

__all__ = ["complete_default_config"]

#: RoPE base of a layer type whose default config names none (transformers' default-rope convention).
DEFAULT_ROPE_THETA = 10000.0
#: Routed experts and top-k of an MoE default config that leaves them unset (a small Mixtral-like MoE).
DEFAULT_EXPERTS = 8
DEFAULT_TOP_K = 2
#: Keys a sparse-attention indexer selects per query, and keys averaged into one scored block, for a
#: default config that leaves them unset (DeepSeek-V3.2's index_topk; a multiple of the block).
INDEXER_BUDGET, INDEXER_BLOCK = 2048, 4
_EXPERT_FIELDS = ("n_routed_experts", "num_experts", "num_local_experts")
_TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_moe(config: PretrainedConfig) -> bool:
    """An MoE family: its config sets the experts' FFN width."""
    return _int(getattr(config, "moe_intermediate_size", None))


def _experts(config: PretrainedConfig) -> int | None:
    return next((getattr(config, f) for f in _EXPERT_FIELDS if _int(getattr(config, f, None))), None)


def _top_k(config: PretrainedConfig) -> int | None:
    experts = _experts(config)
    return min(DEFAULT_TOP_K, experts) if _is_moe(config) and experts else None


@dataclasses.dataclass(frozen=True)
class _Completion:
    """A field a checkpoint always sets, the value it gets, and how that value is derived."""

    fields: tuple[str, ...]
    value: Callable[[PretrainedConfig], int | None]
    how: str


_COMPLETIONS: tuple[_Completion, ...] = (
    _Completion(
        ("head_dim",),
        lambda c: (
            c.hidden_size // c.num_attention_heads
            if _int(getattr(c, "hidden_size", None)) and _int(getattr(c, "num_attention_heads", None))
            else None
        ),
        "as hidden_size // num_attention_heads",
    ),
    _Completion(
        ("num_key_value_heads",),
        lambda c: c.num_attention_heads if _int(getattr(c, "num_attention_heads", None)) else None,
        "as num_attention_heads: multi-head attention",
    ),
    _Completion(
        _EXPERT_FIELDS, lambda c: DEFAULT_EXPERTS if _is_moe(c) else None, "a small MoE's expert count"
    ),
    _Completion(_TOP_K_FIELDS, _top_k, "top-2 routing"),
    _Completion(("n_shared_experts",), lambda c: 1 if _is_moe(c) else None, "one shared expert"),
    _Completion(("n_group", "topk_group"), lambda c: 1 if _is_moe(c) else None, "no expert groups"),
    # a sparse-attention token indexer (Qwen4-Exp's QSA) whose every field the default leaves unset
    _Completion(
        ("indexer_n_heads",),
        lambda c: c.num_attention_heads if _int(getattr(c, "num_attention_heads", None)) else None,
        "indexer query heads as the attention's",
    ),
    _Completion(("indexer_kv_heads",), lambda c: 1, "one indexer key head, shared by its query heads"),
    _Completion(
        ("indexer_head_dim",),
        lambda c: c.head_dim if _int(getattr(c, "head_dim", None)) else None,
        "as head_dim: the attention's rotary part fits it",
    ),
    _Completion(("indexer_compress_ratio",), lambda c: INDEXER_BLOCK, f"blocks of {INDEXER_BLOCK} keys"),
    _Completion(
        ("indexer_budget",),
        lambda c: INDEXER_BUDGET,
        "selected keys per query, as DeepSeek-V3.2's index_topk",
    ),
)


def _declared(config: PretrainedConfig) -> set[str]:
    """The fields the config class declares (dataclass fields, or attributes set on the instance)."""
    names = set(vars(config))
    if dataclasses.is_dataclass(config):
        names |= {f.name for f in dataclasses.fields(config)}
    return names


def _complete_rope_per_layer_type(config: PretrainedConfig) -> list[str]:
    """An empty ``rope_parameters`` beside ``layer_types`` (Cohere-Compass's default): the rotary module
    reads one table per layer type, which every checkpoint sets; each gets default RoPE."""
    tables, layer_types = getattr(config, "rope_parameters", None), getattr(config, "layer_types", None)
    if tables != {} or not isinstance(layer_types, list) or not layer_types:
        return []
    kinds = list(dict.fromkeys(layer_types))
    config.rope_parameters = {
        kind: {"rope_type": "default", "rope_theta": DEFAULT_ROPE_THETA} for kind in kinds
    }
    return [
        f"rope_parameters[{kind!r}]=default RoPE, theta {DEFAULT_ROPE_THETA:g} (one table per layer type)"
        for kind in kinds
    ]


def _complete_sub_config_rope_theta(config: PretrainedConfig) -> list[str]:
    """A sub-config that declares no ``rope_theta`` beside a config whose ``rope_parameters`` name one
    (DBRX's ``attn_config``, whose attention still reads ``attn_config.rope_theta`` while the default
    config keeps the base in ``rope_parameters``): every checkpoint's sub-config carries the base, the
    same one."""
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if not isinstance(theta, (int, float)):
        return []
    notes = []
    for name in sorted(getattr(type(config), "sub_configs", None) or {}):
        sub = getattr(config, name, None)
        if not isinstance(sub, PretrainedConfig) or hasattr(sub, "rope_theta") or "rope" in name:
            continue
        if not any(
            key.startswith("attn") or "attention" in key for key in (name, type(sub).__name__.lower())
        ):
            continue
        sub.rope_theta = theta
        notes.append(f"{name}.rope_theta={theta:g} (as rope_parameters['rope_theta'])")
    return notes


#: Kinds a ``layer_types`` list names for attention layers (transformers' mask-mapping keys).
_ATTENTION_KINDS = ("full_attention", "sliding_attention", "chunked_attention")
#: Attention every ``_ATTENTION_PERIOD`` layers from ``_ATTENTION_OFFSET`` in a completed hybrid list.
_ATTENTION_PERIOD, _ATTENTION_OFFSET = 4, 2


def _layer_kinds_named(config: PretrainedConfig) -> tuple[list[str], list[str]]:
    """String constants the config's modeling module compares ``config.layer_types[...]`` with
    (LFM2-MoE's ``config.layer_types[layer_idx] != "conv"``), and the string keys of the dicts it
    looks ``config.layer_types[...]`` up in (the mask mapping ``{"full_attention": ..., "conv": ...}``),
    each first seen first."""
    import ast
    import importlib
    import inspect

    try:
        module = importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
        tree = ast.parse(inspect.getsource(module))
    except (ImportError, OSError, TypeError, SyntaxError):
        return [], []

    def reads_layer_types(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "layer_types"
        )

    compared, looked_up, dicts = [], set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and len(node.comparators) == 1:
            right = node.comparators[0]
            if (
                reads_layer_types(node.left)
                and isinstance(right, ast.Constant)
                and isinstance(right.value, str)
            ):
                compared.append(right.value)
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Name)
            and reads_layer_types(node.slice)
        ):
            looked_up.add(node.value.id)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            keys = [
                k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)
            ]
            for target in node.targets:
                if isinstance(target, ast.Name):
                    dicts.setdefault(target.id, []).extend(keys)
    keys = [key for name in sorted(looked_up) for key in dicts.get(name, [])]
    return list(dict.fromkeys(compared)), list(dict.fromkeys(keys))


def _complete_layer_types(config: PretrainedConfig) -> list[str]:
    """``layer_types`` None where the modeling code reads it per layer and tells apart a kind that is
    not attention (LFM2-MoE's ``"conv"``): every checkpoint of such a hybrid lists its layers, mostly
    of that kind with attention between. Filled as ``full_attention`` every 4th layer from layer 2,
    the other kind elsewhere (LFM2's own checkpoints interleave them so)."""
    if "layer_types" not in _declared(config) or getattr(config, "layer_types", None) is not None:
        return []
    layers = getattr(config, "num_hidden_layers", None)
    compared, looked_up = _layer_kinds_named(config)
    # the kinds compared against; where those are attention kinds only (LFM2-MoE on transformers 5.17
    # tests ``== "full_attention"``), the other kind is the mask mapping's
    others = [kind for kind in compared if kind not in _ATTENTION_KINDS] or [
        kind for kind in looked_up if kind not in _ATTENTION_KINDS
    ]
    if not _int(layers) or len(others) != 1:
        return []
    config.layer_types = [
        "full_attention" if i % _ATTENTION_PERIOD == _ATTENTION_OFFSET else others[0] for i in range(layers)
    ]
    return [
        f"layer_types={others[0]!r} layers with 'full_attention' every {_ATTENTION_PERIOD}th layer from"
        f" layer {_ATTENTION_OFFSET} (a hybrid checkpoint lists its layers; the default leaves them unset)"
    ]


def complete_default_config(config: PretrainedConfig) -> list[str]:
    """Fill, in place, the fields a default ``config`` leaves None that a checkpoint always sets.

    Returns one note per filled field (``head_dim=128 (as hidden_size // num_attention_heads)``); an
    empty list when the config was complete (or is heterogeneous: per-layer values).
    """
    if getattr(config, "is_heterogeneous", False):  # per-layer values: not one field to fill
        return []
    notes = _complete_fields(config) + _complete_text_config(config)
    text = _text_config(config)
    if text is not None:  # a multimodal default: its text decoder is what gets onboarded
        notes += [f"text_config.{note}" for note in _complete_fields(text)]
    return notes


def _complete_text_config(config: PretrainedConfig) -> list[str]:
    """A composite default that leaves its ``text_config`` None (Gemma 4's assistant on transformers
    5.17; later releases build it): every checkpoint names its text decoder, and the config class
    builds its default one from an empty ``text_config``."""
    if (
        "text_config" not in (type(config).sub_configs or {})
        or getattr(config, "text_config", None) is not None
    ):
        return []
    try:
        text = type(config)(text_config={}).text_config
    except Exception:  # noqa: BLE001 - a class that builds no default text config: left as it is
        return []
    if not isinstance(text, PretrainedConfig):
        return []
    config.text_config = text
    return [f"text_config={type(text).__name__}() (the class's default text decoder)"]


def _text_config(config: PretrainedConfig) -> PretrainedConfig | None:
    try:
        text = config.get_text_config(decoder=True)
    except (AttributeError, ValueError, TypeError):
        return None
    if text is config or not isinstance(text, PretrainedConfig) or getattr(text, "is_heterogeneous", False):
        return None
    return text


def _complete_fields(config: PretrainedConfig) -> list[str]:
    declared, notes = _declared(config), []
    for completion in _COMPLETIONS:
        for name in completion.fields:
            if name not in declared or getattr(config, name, None) is not None:
                continue
            value = completion.value(config)
            if value is None:
                continue
            setattr(config, name, value)
            notes.append(f"{name}={value} ({completion.how})")
    notes += _complete_layer_types(config)
    return notes + _complete_rope_per_layer_type(config) + _complete_sub_config_rope_theta(config)
