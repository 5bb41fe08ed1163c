"""Shrink a transformers causal-LM config to a tiny copy that keeps every structural feature.

Equivalence tests build the HuggingFace model and the lean model from one tiny config, so the tiny
config must exercise everything the real one does: the same attention kind (MHA / MQA / GQA / MLA),
every distinct layer kind (sliding / full / linear attention, mamba, dense and MoE MLPs, no-RoPE
layers), routing (top-k > 1, grouped top-k, shared experts), sliding windows shorter than a test
sequence, the same RoPE variant and tied embeddings.

Every change is made by config field name, from two tables, never by ``model_type``:

- ``_LAYER_RULES``: fields that say what layer ``i`` is (per-layer lists, index sets, thresholds,
  periods). The fewest layers that show every value of every such field are picked (at least 2),
  each field is rewritten for the picked layers, and a pick that a period field cannot express is
  skipped for the next smallest one. The result is checked field by field against the picked layers.
- ``_WIDTH_RULES``: width fields (heads, head dims, FFN sizes, experts and routing, MLA ranks, SSM
  and linear-attention sizes, windows and chunks, RoPE factor lists), applied in order after the
  hidden size and vocabulary are set; every ``*_token_id`` is then moved into the new vocabulary.

Legacy field names (``n_embd``, ``n_head``, ...) are reached through the config's ``attribute_map``.
Two rules look at how fields relate rather than at one field: a ``head_dim`` equal to
``qk_rope_head_dim`` in an MLA config stays equal to it (DeepSeek-V2/V3, Kimi-Linear, MiniCPM3,
LongCat), one equal to ``qk_nope_head_dim + qk_rope_head_dim`` stays their sum (Dots3's SWA layers), and ``head_dim`` in a config without attention heads (Mamba2) is the SSM head dim.
Fields no rule names whose value has one entry per layer (Gemma-3n's ``intermediate_size``) are
per-layer lists too, and shrink entry by entry. Layers that read another layer's keys and values
(``kv_source_layers``, ``num_kv_shared_layers``) come with the layer they read. transformers'
sparse ``per_layer_config`` overrides are picked with their layers and shrunk as each layer's config
would be; an overridden width stays different from the global one. Composite configs (text + vision)
are refused.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from transformers import PretrainedConfig

__all__ = ["distinct_layer_kinds", "tiny_config"]

_HEADS = 4
_GQA_KV_HEADS = 2
_INTERMEDIATE = 128
_MOE_INTERMEDIATE = 32
_SHARED_INTERMEDIATE = 48
_MAX_EXPERTS = 8
_MAX_TOP_K = 4
_MAX_EXPERT_GROUPS = 4
_MAX_SHARED_EXPERTS = 2
_TEMPERATURE_PERIOD = 3  # q scaled by log(1 + floor((position + 1) / period)): changes within 6 tokens
_WINDOW = 8  # sliding windows, attention chunks, SSM / lightning-attention chunks: < a 16-token test
_Q_LORA_RANK = 48
_KV_LORA_RANK = 32
_QK_NOPE_HEAD_DIM = 16
_QK_ROPE_HEAD_DIM = 8
_LINEAR_KEY_HEADS = 2
_LINEAR_HEADS = 4
_SMALL_HEAD_DIM = 16  # SSM, linear-attention and sparse-attention indexer heads
_SSM_STATE = 16
_SSM_GROUPS = 2
_SSM_DT_RANK = 8
_FFN_MULTIPLE = 16

_Values = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Depth: per-layer pattern fields
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LayerRule:
    """One field that says something about layer ``i``.

    form: ``list`` (value per layer), ``cycle`` (a list repeated over the layers), ``runs`` (a list
    of ``[pattern, repeats]``, GPT-Neo's ``attention_types``), ``indices`` (layer i is listed),
    ``sources`` (per layer, the index of the layer whose keys and values it reads), ``overrides``
    (transformers' sparse ``per_layer_config``: layer index -> overridden fields), ``below``
    (i < value), ``up_to`` (i <= value), ``last`` (one of the last ``value`` layers) or ``every`` (i % value == offset, offset default value - 1).
    dense_when: the per-layer value that makes the layer's MLP dense (MoE configs only).
    """

    field: str
    form: str
    offset_field: str | None = None
    dense_when: Any = None


_LAYER_RULES: tuple[_LayerRule, ...] = (
    _LayerRule("layer_types", "list"),
    _LayerRule("layers_block_type", "list"),
    _LayerRule("block_types", "cycle"),
    _LayerRule("attention_types", "runs"),
    _LayerRule("per_layer_config", "overrides"),
    _LayerRule("kv_source_layers", "sources"),
    _LayerRule("index_layers", "indices"),
    _LayerRule("mlp_layer_types", "list", dense_when="dense"),
    _LayerRule("no_rope_layers", "list"),
    _LayerRule("layer_rope_theta", "list"),  # a RoPE base per layer, 0 for none (Granite-SWA)
    _LayerRule("num_attention_heads_per_layer", "list"),
    _LayerRule("attn_layer_period", "every", offset_field="attn_layer_offset"),
    _LayerRule("attn_layer_indices", "indices"),
    _LayerRule("full_attn_idxs", "indices"),
    _LayerRule("max_window_layers", "below"),
    _LayerRule("num_kv_shared_layers", "last"),
    _LayerRule("sliding_window_pattern", "every"),
    _LayerRule("global_attn_every_n_layers", "every"),
    _LayerRule("no_rope_layer_interval", "every"),
    _LayerRule("first_k_dense_replace", "below", dense_when=True),
    _LayerRule("num_dense_layers", "below", dense_when=True),
    _LayerRule("moe_layer_start_index", "below", dense_when=True),
    _LayerRule("moe_layer_end_index", "up_to", dense_when=False),
    _LayerRule("moe_layer_interval", "every", dense_when=False),
    _LayerRule("decoder_sparse_step", "every", dense_when=False),
    _LayerRule("mlp_only_layers", "indices", dense_when=True),
    _LayerRule("moe_layers", "indices", dense_when=False),
    _LayerRule("interleave_moe_layer_step", "every", dense_when=False),
    _LayerRule("expert_layer_period", "every", offset_field="expert_layer_offset", dense_when=False),
)

_EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_MIXER_FIELDS = ("layer_types", "layers_block_type")  # field or property, transformers' convention


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _column(rule: _LayerRule, values: Mapping[str, Any], num_layers: int) -> list[Any] | None:
    """The value of ``rule`` for every layer, or None where the field is absent or unset."""
    value = values.get(rule.field)
    layers = range(num_layers)
    if rule.form == "list":
        return list(value) if isinstance(value, list) and len(value) == num_layers else None
    if rule.form == "cycle":
        return [value[i % len(value)] for i in layers] if isinstance(value, list) and value else None
    if rule.form == "runs":
        expanded = [kind for pattern, repeats in value or () for _ in range(repeats) for kind in pattern]
        return expanded if len(expanded) == num_layers else None
    if rule.form == "indices":
        return [i in value for i in layers] if isinstance(value, list) else None
    if rule.form == "sources":
        if not isinstance(value, list) or len(value) != num_layers:
            return None
        read = {source for i, source in enumerate(value) if source != i}
        return ["reads" if value[i] != i else "stores" if i in read else "own" for i in layers]
    if rule.form == "overrides":
        overrides = _overrides(value)
        return [repr(sorted(overrides.get(i, {}).items())) for i in layers] if overrides else None
    if not _is_int(value):
        return None
    if rule.form == "below":
        return [i < value for i in layers]
    if rule.form == "up_to":
        return [i <= value for i in layers]
    if rule.form == "last":
        return [i >= num_layers - value for i in layers]
    if value < 1:
        return None
    offset = values.get(rule.offset_field, value - 1) if rule.offset_field else value - 1
    return [i % value == offset for i in layers]


def _overrides(value: Any) -> dict[int, dict[str, Any]]:
    """transformers' ``per_layer_config`` (keys ``"05"`` or ``5``) as {layer index: overrides}."""
    if not isinstance(value, Mapping):
        return {}
    return {int(key): dict(fields) for key, fields in value.items() if isinstance(fields, Mapping)}


def _per_layer_lists(values: Mapping[str, Any], num_layers: int) -> tuple[_LayerRule, ...]:
    """Fields no rule names whose value has one number or name per layer (Gemma-3n's
    ``intermediate_size`` and ``activation_sparsity_pattern``)."""
    named = {rule.field for rule in _LAYER_RULES}
    return tuple(
        _LayerRule(name, "list")
        for name, value in values.items()
        if name not in named
        and isinstance(value, list)
        and len(value) == num_layers
        and all(isinstance(item, (int, float, str)) for item in value)
    )


def _columns(values: Mapping[str, Any], num_layers: int) -> dict[_LayerRule, list[Any]]:
    rules = _LAYER_RULES + _per_layer_lists(values, num_layers)
    columns = {rule: _column(rule, values, num_layers) for rule in rules}
    return {rule: column for rule, column in columns.items() if column is not None}


def _period_for(bits: Sequence[bool], old: tuple[int, int | None]) -> tuple[int, int | None] | None:
    """Smallest (period, offset) whose ``i % period == offset`` gives ``bits``; the old one first."""
    with_offset = old[1] is not None
    candidates = [old]
    for period in range(1, len(bits) + 2):
        candidates += [(period, offset) for offset in range(period)] if with_offset else [(period, None)]
    for period, offset in candidates:
        target = offset if with_offset else period - 1
        if all((i % period == target) == bit for i, bit in enumerate(bits)):
            return period, offset
    return None


def _rewrite_layer_fields(
    columns: Mapping[_LayerRule, list[Any]], values: Mapping[str, Any], picked: Sequence[int]
) -> _Values | None:
    """New values of the per-layer fields for the ``picked`` layers, or None if a period can't say it."""
    new: _Values = {}
    for rule, column in columns.items():
        old = values[rule.field]
        if rule.form in ("list", "cycle"):
            new[rule.field] = [column[i] for i in picked]
        elif rule.form == "runs":
            new[rule.field] = [[[column[i]], 1] for i in picked]
        elif rule.form == "sources":
            new[rule.field] = [picked.index(old[i]) for i in picked]
        elif rule.form == "overrides":
            overrides = _overrides(old)
            new[rule.field] = {j: overrides[i] for j, i in enumerate(picked) if i in overrides}
        elif rule.form == "indices":
            new[rule.field] = [j for j, i in enumerate(picked) if i in old]
        elif rule.form == "below":
            new[rule.field] = sum(i < old for i in picked)
        elif rule.form == "up_to":
            new[rule.field] = sum(i <= old for i in picked) - 1
        elif rule.form == "last":
            new[rule.field] = sum(column[i] for i in picked)
        else:
            offset = values[rule.offset_field] if rule.offset_field else None
            found = _period_for([column[i] for i in picked], (old, offset))
            if found is None:
                return None
            new[rule.field] = found[0]
            if rule.offset_field:
                new[rule.offset_field] = found[1]
    return new


def _pick_layers(values: Mapping[str, Any], num_layers: int) -> tuple[list[int], _Values]:
    """The fewest layers (at least 2) that show every value of every per-layer field."""
    columns = _columns(values, num_layers)
    first_with: dict[tuple[Any, ...], int] = {}
    for i in range(num_layers):
        first_with.setdefault(tuple(column[i] for column in columns.values()), i)
    representatives = sorted(first_with.values())
    needed = {(rule, value) for rule, column in columns.items() for value in column}
    for size in range(1, len(representatives) + 1):
        for combo in itertools.combinations(representatives, size):
            if {(rule, column[i]) for rule, column in columns.items() for i in combo} != needed:
                continue
            picked = _with_sources(list(combo), columns, values)
            if len(picked) < min(2, num_layers):
                picked = sorted({*picked, min(set(range(num_layers)) - set(picked))})
            rewritten = _rewrite_layer_fields(columns, values, picked)
            if rewritten is not None:
                return picked, rewritten
    names = ", ".join(rule.field for rule in columns)
    raise ValueError(f"no subset of layers can be described by the per-layer fields ({names})")


def _with_sources(
    picked: list[int], columns: Mapping[_LayerRule, list[Any]], values: Mapping[str, Any]
) -> list[int]:
    """``picked`` and the layers whose keys and values a picked layer reads: its listed source, or for
    one of the last ``num_kv_shared_layers`` layers the last unshared layer of its layer type."""
    for rule, column in columns.items():
        if rule.form == "sources":
            picked = sorted({*picked, *(values[rule.field][i] for i in picked)})
        elif rule.form == "last":
            kinds = values.get("layer_types") or [None] * len(column)
            unshared = [j for j, shared in enumerate(column) if not shared]
            producers = {kinds[j]: j for j in unshared}  # the last one of each kind
            picked = sorted(
                {*picked, *(producers[kinds[i]] for i in picked if column[i] and kinds[i] in producers)}
            )
    return picked


def _mixer_kinds(config: PretrainedConfig, num_layers: int) -> list[str]:
    for name in _MIXER_FIELDS:
        kinds = getattr(config, name, None)
        if isinstance(kinds, list) and len(kinds) == num_layers:
            return [str(kind) for kind in kinds]
    window = getattr(config, "sliding_window", None)
    sliding = _is_int(window) and window > 0 and getattr(config, "use_sliding_window", True) is not False
    return ["sliding_attention" if sliding else "full_attention"] * num_layers


def distinct_layer_kinds(config: PretrainedConfig) -> list[str]:
    """Sorted layer kinds a config builds: mixer kinds, ``dense``/``moe`` MLPs, ``rope``/``no_rope``.

    Mixer kinds are transformers' own ``layer_types`` (or ``layers_block_type``) values; a config
    without them is all ``sliding_attention`` (a sliding window is set) or all ``full_attention``.
    """
    num_layers = config.num_hidden_layers
    kinds = set(_mixer_kinds(config, num_layers))
    values = _init_values(config)
    columns = _columns(values, num_layers)
    if not kinds & {"moe", "mlp"}:
        has_experts = any(_is_int(values.get(name)) and values[name] > 0 for name in _EXPERT_FIELDS)
        dense_rules = [(rule, column) for rule, column in columns.items() if rule.dense_when is not None]
        for i in range(num_layers):
            dense = not has_experts or any(column[i] == rule.dense_when for rule, column in dense_rules)
            kinds.add("dense" if dense else "moe")
    no_rope = values.get("no_rope_layers")
    if isinstance(no_rope, list):
        kinds.update("rope" if flag else "no_rope" for flag in no_rope)
    return sorted(kinds)


# --------------------------------------------------------------------------------------------------
# Width: one rule per field name
# --------------------------------------------------------------------------------------------------

_Rule = Callable[[Any, Mapping[str, Any], Mapping[str, Any]], Any]  # (old value, old values, new values)


def _like(old: int, old_ref: int, new_ref: int) -> int:
    """``new_ref`` if ``old == old_ref``; twice it if ``old`` was larger; half of it if smaller."""
    if old == old_ref:
        return new_ref
    return 2 * new_ref if old > old_ref else max(new_ref // 2, 1)


def _const(value: int) -> _Rule:
    return lambda old, o, n: value if _is_int(old) and old > 0 else old


def _at_most(value: int) -> _Rule:
    return lambda old, o, n: min(old, value) if _is_int(old) and old > 0 else old


def _old_head_dim(o: Mapping[str, Any]) -> int:
    head_dim = o.get("head_dim")
    return head_dim if _is_int(head_dim) else o["hidden_size"] // o["num_attention_heads"]


def _new_head_dim(o: Mapping[str, Any], n: Mapping[str, Any]) -> int:
    head_dim = n.get("head_dim")
    return head_dim if _is_int(head_dim) else n["hidden_size"] // n["num_attention_heads"]


def _kv_heads(old: int, o: Mapping[str, Any], n: Mapping[str, Any]) -> int:
    if old == o["num_attention_heads"]:
        return n["num_attention_heads"]
    return 1 if old == 1 else _GQA_KV_HEADS


def _head_dim(old: int, o: Mapping[str, Any], n: Mapping[str, Any]) -> int:
    if "num_attention_heads" not in o:  # an SSM-only config (Mamba2): the SSM head dim
        return _SMALL_HEAD_DIM
    if old == o.get("qk_rope_head_dim") and o.get("kv_lora_rank") is not None:
        return n["qk_rope_head_dim"]
    nope, rope = o.get("qk_nope_head_dim"), o.get("qk_rope_head_dim")
    if _is_int(nope) and _is_int(rope) and old == nope + rope:  # the full q/k head of an MLA layer (Dots3)
        return n["qk_nope_head_dim"] + n["qk_rope_head_dim"]
    old_ref = o["hidden_size"] // o["num_attention_heads"]
    return _like(old, old_ref, n["hidden_size"] // n["num_attention_heads"])


def _v_head_dim(old: int, o: Mapping[str, Any], n: Mapping[str, Any]) -> int:
    if o.get("kv_lora_rank") is not None:
        return _like(old, o["qk_nope_head_dim"], n["qk_nope_head_dim"])
    return _like(old, _old_head_dim(o), _new_head_dim(o, n))


def _expert_groups(old: int, o: Mapping[str, Any], n: Mapping[str, Any]) -> int:
    return min(old, _MAX_EXPERT_GROUPS) if old > 1 else old


def _group_count(values: Mapping[str, Any]) -> int:
    groups = values.get("n_group", values.get("num_expert_group"))
    return groups if _is_int(groups) and groups > 1 else 1


def _experts(old: int, o: Mapping[str, Any], n: Mapping[str, Any]) -> int:
    if old <= 0:
        return old
    groups = _group_count(n)
    experts = min(old, _MAX_EXPERTS)
    return max(experts - experts % groups, 2 * groups) if groups > 1 else experts


def _topk_group(old: int, o: Mapping[str, Any], n: Mapping[str, Any]) -> int:
    old_groups, new_groups = _group_count(o), _group_count(n)
    if old >= old_groups:
        return new_groups
    return min(max(1, old * new_groups // old_groups), new_groups - 1)


def _top_k(old: int, o: Mapping[str, Any], n: Mapping[str, Any]) -> int:
    """At most 4 and no more than the experts that grouped routing can reach; > 1 stays > 1."""
    reachable = next(n[name] for name in _EXPERT_FIELDS if _is_int(n.get(name)))
    topk_group = n.get("topk_group")
    if _is_int(topk_group) and _group_count(n) > 1:
        reachable = topk_group * reachable // _group_count(n)
    return min(old, _MAX_TOP_K, reachable)


def _zero_experts(old: int, o: Mapping[str, Any], n: Mapping[str, Any]) -> int:
    """Identity ("zero") experts keep their share of the routed experts."""
    old_experts, new_experts = (
        next(v[name] for name in _EXPERT_FIELDS if _is_int(v.get(name))) for v in (o, n)
    )
    return max(1, round(old * new_experts / old_experts))


def _heads_per_layer(old: list[int], o: Mapping[str, Any], n: Mapping[str, Any]) -> list[int]:
    kv = n["num_key_value_heads"] or n["num_attention_heads"]
    return [max(kv, round(h * n["num_attention_heads"] / o["num_attention_heads"] / kv) * kv) for h in old]


def _index_heads_per_kv_head(old: int, o: Mapping[str, Any], n: Mapping[str, Any]) -> int:
    kv = n.get("num_key_value_heads") or n["num_attention_heads"]
    return max(1, min(old, n["num_attention_heads"] // kv))


def _linear_value_heads(old: int, o: Mapping[str, Any], n: Mapping[str, Any]) -> int:
    return max(1, round(old * n["linear_num_key_heads"] / o["linear_num_key_heads"]))


def _ssm_heads(old: int, o: Mapping[str, Any], n: Mapping[str, Any]) -> int:
    expand = o.get("mamba_expand", o.get("expand", 2))
    return expand * n["hidden_size"] // _SMALL_HEAD_DIM


def _ssm_inner(old: int, o: Mapping[str, Any], n: Mapping[str, Any]) -> int:
    heads = next(n[name] for name in ("mamba_n_heads", "mamba_num_heads") if name in n)
    head_dim = next(n[name] for name in ("mamba_d_head", "mamba_head_dim") if name in n)
    return heads * head_dim


def _scale_with_head_dim(old: int, o: Mapping[str, Any], n: Mapping[str, Any]) -> int:
    return max(1, round(old * _new_head_dim(o, n) / _old_head_dim(o)))


def _token_id(old: Any, vocab_size: int) -> Any:
    """Token ids (one or a list) moved into the new vocabulary."""
    if isinstance(old, list):
        return [_token_id(token, vocab_size) for token in old]
    return old % vocab_size if _is_int(old) and old >= vocab_size else old


def _resample(factors: list[float], length: int) -> list[float]:
    if length <= 1:
        return factors[:length]
    last = len(factors) - 1
    return [factors[round(i * last / (length - 1))] for i in range(length)]


def _rope_parameters(old: dict[str, Any], o: Mapping[str, Any], n: Mapping[str, Any]) -> dict[str, Any]:
    """Resize per-frequency factor lists (longrope short/long factors) to the new rotary dim."""
    if all(isinstance(value, dict) for value in old.values()):  # one entry per layer type
        return {key: _rope_parameters(value, o, n) for key, value in old.items()}
    new = dict(old)
    fraction = old.get("partial_rotary_factor", o.get("partial_rotary_factor", 1.0))
    length = int(_new_head_dim(o, n) * fraction) // 2
    for key in ("short_factor", "long_factor"):
        if isinstance(old.get(key), list):
            new[key] = _resample(old[key], length)
    return new


# Applied in order; a rule may read the new values of fields above it. None values stay None.
_WIDTH_RULES: tuple[tuple[tuple[str, ...], _Rule], ...] = (
    (("num_attention_heads",), _const(_HEADS)),
    (("num_key_value_heads", "num_kv_heads", "kv_n_heads"), _kv_heads),  # Falcon, DBRX
    (("num_attention_heads_per_layer",), _heads_per_layer),
    # MLA: ranks and head dims shrink, q_lora_rank None (no q compression) stays None
    (("q_lora_rank",), _const(_Q_LORA_RANK)),
    (("kv_lora_rank",), _const(_KV_LORA_RANK)),
    (("qk_nope_head_dim",), _const(_QK_NOPE_HEAD_DIM)),
    (("qk_rope_head_dim",), _const(_QK_ROPE_HEAD_DIM)),
    (("qk_head_dim",), lambda old, o, n: n["qk_nope_head_dim"] + n["qk_rope_head_dim"]),
    (("head_dim", "kv_channels", "d_head"), _head_dim),  # d_head: XLNet
    (("v_head_dim",), _v_head_dim),
    (("query_pre_attn_scalar", "rotary_dim"), _scale_with_head_dim),
    # feed-forward widths
    # dff: CTRL's
    (("intermediate_size", "intermediate_size_mlp", "ffn_hidden_size", "dff"), _const(_INTERMEDIATE)),
    (("block_multiple_of",), _at_most(_FFN_MULTIPLE)),  # FFN sizes rounded up to a multiple of it
    (("dense_intermediate_size", "prefix_dense_intermediate_size"), _const(_INTERMEDIATE)),
    (("moe_intermediate_size", "expert_ffn_hidden_size"), _const(_MOE_INTERMEDIATE)),
    (
        (
            "shared_expert_intermediate_size",
            "moe_shared_expert_intermediate_size",
            "shared_intermediate_size",
            "shared_experts_intermediate_size",
        ),
        _const(_SHARED_INTERMEDIATE),
    ),
    # MoE routing: groups first, then experts (a multiple of the groups), then top-k
    (("n_group", "num_expert_group"), _expert_groups),
    (("topk_group",), _topk_group),
    (_EXPERT_FIELDS, _experts),
    (("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts"), _top_k),
    (("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), _at_most(_MAX_SHARED_EXPERTS)),
    (("zero_expert_num",), _zero_experts),
    # sparse-attention indexer (DSA): few heads, and fewer selected tokens than a test sequence
    (("index_n_heads",), _const(_HEADS)),
    (("index_head_dim",), _const(_SMALL_HEAD_DIM)),
    (("index_topk",), _at_most(_WINDOW)),
    (("index_num_heads",), _index_heads_per_kv_head),  # indexer heads within one KV head's queries
    (("index_pool_size",), _at_most(2 * _WINDOW)),
    (("index_num_local_tokens", "index_num_sink_tokens"), _at_most(_WINDOW // 2)),
    # per-layer token embeddings (Gemma-3n, Gemma 4): the text vocabulary, a small width
    (("vocab_size_per_layer_input",), lambda old, o, n: max(1, old * n["vocab_size"] // o["vocab_size"])),
    (("hidden_size_per_layer_input",), _const(_SMALL_HEAD_DIM)),
    # linear attention (gated delta net, KDA), RG-LRU and SSM mixers
    (("linear_num_key_heads",), _const(_LINEAR_KEY_HEADS)),
    (("linear_num_value_heads",), _linear_value_heads),
    (("linear_num_heads",), _const(_LINEAR_HEADS)),
    (("linear_key_head_dim", "linear_head_dim"), _const(_SMALL_HEAD_DIM)),
    (("linear_value_head_dim",), lambda old, o, n: _like(old, o["linear_key_head_dim"], _SMALL_HEAD_DIM)),
    (("lru_width",), lambda old, o, n: _like(old, o["hidden_size"], n["hidden_size"])),
    (("mamba_d_head", "mamba_head_dim"), _const(_SMALL_HEAD_DIM)),
    (("mamba_n_heads", "mamba_num_heads", "num_heads"), _ssm_heads),  # num_heads: Mamba2
    (("mamba_d_ssm",), _ssm_inner),
    (("mamba_d_state", "ssm_state_size", "state_size"), _const(_SSM_STATE)),
    (("mamba_n_groups", "n_groups"), _at_most(_SSM_GROUPS)),
    (("mamba_dt_rank", "time_step_rank"), _const(_SSM_DT_RANK)),
    # windows and chunks smaller than a test sequence (block_size: MiniMax lightning attention)
    (
        (
            "sliding_window",
            "window_size",
            "attention_chunk_size",
            "mamba_chunk_size",
            "chunk_size",
            "block_size",
        ),
        _at_most(_WINDOW),
    ),
    # a period of the attention temperature shorter than the analyzer's probes (Llama 4's floor_scale)
    (("floor_scale",), _at_most(_TEMPERATURE_PERIOD)),
    (("rope_parameters",), _rope_parameters),
)


_WIDTH_NAMES = {name for names, _ in _WIDTH_RULES for name in names}


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def _init_values(config: PretrainedConfig) -> _Values:
    """The config's constructor arguments (dataclass init fields) with their current values, the global
    ones where ``per_layer_config`` overrides a field, and the overrides themselves."""
    get = getattr(config, "_getattr_without_heterogeneous_validation", lambda name: getattr(config, name))
    values = {field.name: get(field.name) for field in dataclasses.fields(config) if field.init}
    if config.is_heterogeneous:
        values["per_layer_config"] = config.to_dict()["per_layer_config"]
    return values


def _has(config: PretrainedConfig, name: str) -> bool:
    has = getattr(config, "_hasattr_without_heterogeneous_validation", None)
    return has(name) if has is not None else hasattr(config, name)


def _shrink_widths(old: Mapping[str, Any], new: _Values, num_layers: int) -> None:
    """Apply the width rules to ``new`` in order; a per-layer list (``num_layers`` long in ``old``)
    shrinks entry by entry."""
    per_layer = {rule.field for rule in _per_layer_lists(old, num_layers)}
    for names, rule in _WIDTH_RULES:
        for name in names:
            value = new.get(name)
            if value is None:
                continue
            if name in per_layer and isinstance(value, list):
                new[name] = [rule(item, old, new) for item in value]
            else:
                new[name] = rule(value, old, new)


def _shrink_overrides(old: Mapping[str, Any], new: _Values, num_layers: int) -> None:
    """Shrink each layer's ``per_layer_config`` overrides as its whole config would shrink; a field that
    differed from the global value still differs (twice or half the tiny global value)."""
    shrunk = {}
    for layer, fields in _overrides(new.get("per_layer_config")).items():
        layer_old = {**old, **fields}
        layer_new = {**layer_old, "hidden_size": new["hidden_size"], "vocab_size": new["vocab_size"]}
        _shrink_widths(layer_old, layer_new, num_layers)
        shrunk[layer] = {}
        for name, value in fields.items():
            tiny = layer_new[name]
            if tiny == new.get(name) and value != old.get(name) and _is_int(value) and _is_int(old.get(name)):
                tiny = _like(value, old[name], new[name])
            shrunk[layer][name] = tiny
        nope, rope = layer_old.get("qk_nope_head_dim"), layer_old.get("qk_rope_head_dim")
        if _is_int(nope) and _is_int(rope) and layer_old.get("head_dim") == nope + rope:
            merged = {**new, **shrunk[layer]}  # the layer's q/k head stays the sum of its two parts
            if merged.get("head_dim") != merged["qk_nope_head_dim"] + merged["qk_rope_head_dim"]:
                shrunk[layer]["head_dim"] = merged["qk_nope_head_dim"] + merged["qk_rope_head_dim"]
    new["per_layer_config"] = shrunk


def _parts(config: PretrainedConfig) -> list[str]:
    """Sub-configs that are parts of this model's config (MPT's ``attn_config``, DBRX's ``ffn_config``):
    no ``model_type`` of their own, unlike a text or vision model's config."""
    return [name for name, cls in type(config).sub_configs.items() if not getattr(cls, "model_type", "")]


def _shrink_part(
    part: PretrainedConfig, old: Mapping[str, Any], new: Mapping[str, Any], num_layers: int
) -> PretrainedConfig:
    """A part sub-config shrunk with the same rules, read against its parent's old and new values; a
    field the parent also has (``hidden_size``) takes the parent's new value."""
    fields = _init_values(part)
    part_old = {**old, **fields}
    part_new = {**new, **fields}
    for name in fields:
        if (
            name in new
            and name not in _WIDTH_NAMES
            and fields[name] == old.get(name)
            and fields[name] != new[name]
        ):
            part_new[name] = new[name]
    _shrink_widths(part_old, part_new, num_layers)
    tiny = type(part)(**{name: part_new[name] for name in fields})
    for key, value in part.to_dict().items():  # attributes beyond its fields (DBRX's rope_theta)
        if not _has(tiny, key):
            setattr(tiny, key, copy.deepcopy(value))
    return tiny


def _check_supported(config: PretrainedConfig) -> None:
    name = type(config).__name__
    modalities = [sub for sub in type(config).sub_configs if sub not in _parts(config)]
    if modalities:
        names = ", ".join(modalities)
        raise ValueError(
            f"{name} has sub-configs ({names}); pass a text-only config such as config.get_text_config()"
        )


def tiny_config(
    config: PretrainedConfig, *, hidden_size: int = 64, vocab_size: int = 1000
) -> PretrainedConfig:
    """A shrunken copy of a causal-LM ``config`` for equivalence tests; ``config`` is left untouched.

    Width: ``hidden_size``, 4 query heads (kv heads 4 / 2 / 1 for MHA / GQA / MQA), small head dims,
    FFN 128, experts <= 8 with top-k <= 4, windows and chunks of 8, ``vocab_size`` tokens.
    Depth: the fewest layers (at least 2) that contain every distinct value of every per-layer field.
    """
    _check_supported(config)
    fields = _init_values(config)
    parts = {
        name: fields.pop(name) for name in _parts(config) if isinstance(fields.get(name), PretrainedConfig)
    }
    overrides = fields.pop("per_layer_config", None)
    aliases = dict(type(config).attribute_map)  # standard name -> this config's field (n_embd, ...)
    old = copy.deepcopy(
        {**config.to_dict(), **fields, "per_layer_config": overrides}
    )  # derived attributes too, for the rules to read
    old.update({standard: old[field] for standard, field in aliases.items() if field in old})
    picked, layer_fields = _pick_layers(old, config.num_hidden_layers)
    new = {**old, **layer_fields, "hidden_size": hidden_size, "vocab_size": vocab_size}
    new["num_hidden_layers"] = len(picked)
    _shrink_widths(old, new, config.num_hidden_layers)
    if overrides:
        _shrink_overrides(old, new, config.num_hidden_layers)
    for name in [name for name in new if name.endswith("_token_id")]:
        new[name] = _token_id(new[name], vocab_size)
    # the shrunken name wins: the alias where a rule shrank it, else the field itself where the
    # attribute map points the other way (Exaone's num_layers -> num_hidden_layers, the real field)
    new.update(
        {
            field: new[standard]
            for standard, field in aliases.items()
            if standard in new and (new[standard] != old[standard] or new.get(field) == old.get(field))
        }
    )
    # The constructor re-derives every attribute that is not one of its fields.
    arguments = {key: new[key] for key in fields}
    if "num_hidden_layers" not in fields and "num_hidden_layers" not in aliases:
        arguments["num_hidden_layers"] = len(picked)  # a property over another field (num_layers)
    if overrides:
        arguments["per_layer_config"] = new["per_layer_config"]
    for name, part in parts.items():
        arguments[name] = _shrink_part(part, old, new, config.num_hidden_layers)
    tiny = type(config)(**arguments)
    for key, value in new.items():
        if not _has(tiny, key):
            setattr(tiny, key, value)
    _check_layers(config, tiny, picked)
    return tiny


def _check_layers(config: PretrainedConfig, tiny: PretrainedConfig, picked: Sequence[int]) -> None:
    """Every per-layer field of ``tiny`` describes exactly the ``picked`` layers of ``config``."""
    resized = _WIDTH_NAMES | {"per_layer_config"}
    expected = _columns(_init_values(config), config.num_hidden_layers)
    actual = _columns(_init_values(tiny), tiny.num_hidden_layers)
    for rule, column in expected.items():
        if rule.field not in resized and actual.get(rule) != [column[i] for i in picked]:
            raise ValueError(
                f"{type(config).__name__}.{rule.field}: tiny layers {actual.get(rule)} differ from the picked "
                f"layers {picked} of the original"
            )
