"""State-cache transform: the canonical stateful ops of an exported graph become cached state ops.

``torch_causal_conv1d``, ``torch_ssm``, ``torch_gated_delta_rule``, ``torch_channel_gated_delta_rule``
and ``torch_rg_lru`` nodes become ``onboardlm_cached_causal_conv1d``, ``onboardlm_cached_ssm``,
``onboardlm_cached_gated_delta_rule``, ``onboardlm_cached_channel_gated_delta_rule`` and
``onboardlm_cached_rg_lru`` (:mod:`onboardlm.transforms.state_ops`), with every argument of the
canonical call kept. Each node gets its own state cache (``conv_state_<i>``, ``ssm_state_<i>``,
``delta_state_<i>``, ``lru_state_<i>``: a
:class:`~onboardlm.transforms.kv_cache.CacheSpec` with ``per_token=False``, its ``features`` the
state of one sequence) and reads the graph inputs ``input_pos`` (shared with cached attention) and
``seq_lens`` (``[b]`` int64, real new tokens per row: prompts are right-padded).

:func:`insert_cached_state` runs inside :func:`~onboardlm.transforms.kv_cache.insert_cached_attention`
(the static-batch graph of ``onboardlm run``: batch row ``i`` keeps its state in slot ``i``);
:func:`to_paged_state` runs inside :func:`~onboardlm.transforms.paged_kv_cache.to_paged_attention`
(the packed graph of ``onboardlm serve``): the ops then read the slot of each sequence from a new
``state_slots`` ``[S]`` input, its cached length from ``cached_lens`` and its new tokens from
``query_start``, so each request keeps its own state slot whatever its place in the step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx import Graph, Node
from torch.fx.operator_schemas import normalize_function

import onboardlm.ops  # noqa: F401  (registers the canonical ops)
from onboardlm.errors import UnsupportedFeature
from onboardlm.ops import DECLARED_OPS
from onboardlm.transforms import state_ops
from onboardlm.transforms.graph_tensors import graph_tensor

SEQ_LENS = "seq_lens"
STATE_SLOTS = "state_slots"

#: Position of the state-cache argument in each cached op; ``slots``, ``input_pos`` and ``seq_lens`` follow.
_STATE_ARG = {
    state_ops.CACHED_CAUSAL_CONV1D: 3,
    state_ops.CACHED_SSM: 7,
    state_ops.CACHED_GATED_DELTA_RULE: 7,
    state_ops.CACHED_CHANNEL_GATED_DELTA_RULE: 5,
    state_ops.CACHED_RG_LRU: 6,
}

AddCache = Callable[..., Node]  # (name, features, dtype, per_token) -> the cache's input node


def _op(name: str) -> torch._ops.OpOverload:
    return getattr(torch.ops.auto_deploy, name).default


def _kwargs(node: Node) -> dict:
    """The node's arguments by name, defaults filled in."""
    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    assert normalized is not None
    defaults = {a.name: a.default_value for a in node.target._schema.arguments if a.has_default_value()}
    return {**defaults, **normalized.kwargs}


def _shape(node: Node) -> tuple[int, ...]:
    """The static shape of a tensor node (its export metadata, else the graph's tensor for a weight)."""
    value = node.meta.get("val")
    if value is None and node.op == "get_attr":
        value = graph_tensor(node.graph.owning_module, str(node.target))
    if value is None:
        raise UnsupportedFeature(node.name, "stateful op input without a known shape")
    return tuple(int(d) for d in value.shape)


def _dtype(node: Node) -> torch.dtype:
    return node.meta["val"].dtype


def stateful_nodes(graph: Graph) -> list[Node]:
    """The canonical stateful op nodes of ``graph``, in graph order."""
    targets = {_op(name) for name in state_ops.CACHED_STATE_OPS}
    return [n for n in graph.nodes if n.op == "call_function" and n.target in targets]


def cached_state_nodes(graph: Graph) -> list[Node]:
    """The cached state op nodes of ``graph`` (as this transform writes them), in graph order."""
    targets = {_op(name) for name in _STATE_ARG}
    return [n for n in graph.nodes if n.op == "call_function" and n.target in targets]


def _uncached_state_op(node: Node) -> str | None:
    """The name of the state-space op ``node`` calls when this transform has no cached version of it.

    Every op of :mod:`onboardlm.ops.ssm` carries state from token to token; run uncached, a decode
    step would restart it from zero and silently differ from a full recompute.
    """
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    namespace, _, name = node.target.name().partition("::")
    if namespace != "auto_deploy" or DECLARED_OPS.get(name) != "ssm" or name in state_ops.CACHED_STATE_OPS:
        return None
    return name


def insert_cached_state(graph: Graph, input_pos: Node, add_cache: AddCache) -> int:
    """Replace the stateful nodes of ``graph`` by cached state ops (in place); returns how many.

    ``add_cache(name, features, dtype, per_token)`` adds a cache input and returns its node. The
    ``seq_lens`` input is added after ``input_pos`` when the graph has a stateful node. Raises
    :class:`UnsupportedFeature` for a state-space op without a cached version.
    """
    for node in graph.nodes:
        name = _uncached_state_op(node)
        if name is not None:
            raise UnsupportedFeature(
                node.name, f"{name} state caching", "the runtime has no cached version of this op yet"
            )
    nodes = stateful_nodes(graph)
    if not nodes:
        return 0
    with graph.inserting_after(input_pos):
        seq_lens = graph.placeholder(SEQ_LENS)
    counts: dict[str, int] = {}

    def cache_name(prefix: str) -> str:
        counts[prefix] = counts.get(prefix, -1) + 1
        return f"{prefix}_{counts[prefix]}"

    for node in nodes:
        args = _kwargs(node)
        name = node.target.name().partition("::")[2]
        if name == "torch_causal_conv1d":
            channels = _shape(args["input"])[-1]
            width = state_ops.conv_state_width(_shape(args["weight"]), args["dilation"])
            state = add_cache(cache_name("conv_state"), (width, channels), _dtype(args["input"]), False)
            tensors = [args["input"], args["weight"], args["bias"]]
            kept = ("stride", "padding", "dilation", "groups", "padding_mode", "shardable", "output_sizes")
        elif name == "torch_ssm":
            _, _, heads, head_dim = _shape(args["hidden_states"])
            features = (heads, head_dim, _shape(args["B"])[-1])
            state = add_cache(cache_name("ssm_state"), features, torch.float32, False)
            tensors = [args[k] for k in ("hidden_states", "A", "B", "C", "D", "dt", "dt_bias")]
            kept = ("time_step_limit", "chunk_size", "shardable")
        elif name == "torch_rg_lru":
            state = add_cache(cache_name("lru_state"), (_shape(args["x"])[-1],), torch.float32, False)
            names = ("input_gate_weight", "input_gate_bias", "recurrent_gate_weight", "recurrent_gate_bias")
            tensors = [args[k] for k in ("x", *names, "recurrent_param")]
            kept = ("gate_scale", "shardable")
        else:
            _, _, v_heads, v_dim = _shape(args["v"])
            features = (v_heads, _shape(args["q"])[-1], v_dim)
            state = add_cache(cache_name("delta_state"), features, torch.float32, False)
            inputs = (
                ("g", "beta") if name == "torch_channel_gated_delta_rule" else ("a", "b", "A_log", "dt_bias")
            )
            tensors = [args[k] for k in ("q", "k", "v", *inputs)]
            kept = ("scale", "shardable")
        kwargs = {k: args[k] for k in (*kept, "layer_type")}
        target = _op(state_ops.CACHED_STATE_OPS[name])
        with graph.inserting_before(node):
            cached = graph.call_function(target, (*tensors, state, None, input_pos, seq_lens), kwargs)
        cached.meta = dict(node.meta)
        node.replace_all_uses_with(cached)
        graph.erase_node(node)
    return len(nodes)


def to_paged_state(graph: Graph, cached_lens: Node, query_start: Node, after: Node) -> Node | None:
    """Point the cached state ops of a dense cached graph at the packed batch's inputs (in place).

    Adds the ``state_slots`` input after ``after`` and returns it (None when the graph keeps no state);
    ``input_pos`` becomes ``cached_lens``, ``seq_lens`` the differences of ``query_start`` (the
    ``seq_lens`` input is removed).
    """
    nodes = cached_state_nodes(graph)
    seq_lens_input = next((n for n in graph.nodes if n.op == "placeholder" and n.name == SEQ_LENS), None)
    if not nodes:
        return None
    with graph.inserting_after(after):
        slots = graph.placeholder(STATE_SLOTS)
    with graph.inserting_before(nodes[0]):
        new_tokens = graph.call_function(torch.diff, (query_start,))
    for node in nodes:
        at = _STATE_ARG[node.target.name().partition("::")[2]]
        args = list(node.args)
        args[at + 1 : at + 4] = [slots, cached_lens, new_tokens]
        node.args = tuple(args)
    if seq_lens_input is not None:
        graph.erase_node(seq_lens_input)
    return slots
