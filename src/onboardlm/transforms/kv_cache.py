"""KV-cache transform: every canonical attention node of an exported graph becomes a cached one.

``torch_attention`` nodes become ``onboardlm_cached_attention`` and ``torch_mla`` nodes
``onboardlm_cached_mla`` (see :mod:`onboardlm.transforms.cached_ops`); each keeps its scale, causal
flag, sliding window, logit cap and sinks. Sparse MLA (DeepSeek sparse attention): a
``torch_lightning_indexer`` node becomes ``onboardlm_cached_lightning_indexer`` with its own key
cache (``index_k_cache_<i>``), and the ``torch_sparse_mla`` it feeds a cached MLA node that reads its
mask over the cache. The graph gains inputs: ``input_pos`` (``[b]`` int64, where
each sequence's new tokens go in the cache), ``kv_len`` (a Python int, how many cache positions to
read) and one cache tensor per cached input of each layer (named in :attr:`CachedGraph.caches`).
The stateful ops (conv, SSM, gated delta rule) become cached state ops
(:mod:`onboardlm.transforms.state_cache`), which add a ``seq_lens`` input and one state cache each.
Layers that attend to another layer's keys and values (cross-layer KV sharing: their attention
node takes the same key and value nodes) share that layer's cache. The result is a plain
``GraphModule``: call it with keyword arguments; it returns the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.graph import CodeGen
from torch.fx.operator_schemas import normalize_function

import onboardlm.ops  # noqa: F401  (registers the canonical ops)
from onboardlm.errors import UnsupportedFeature
from onboardlm.transforms import cached_ops
from onboardlm.transforms.cached_key_bias import CACHED_KEY_BIAS_ATTENTION
from onboardlm.transforms.dump import dumps_graph
from onboardlm.transforms.state_cache import insert_cached_state

INPUT_POS = "input_pos"
KV_LEN = "kv_len"


@dataclass(frozen=True)
class CacheSpec:
    """One cache tensor the graph takes: its input name, per-token shape and dtype.

    ``per_token`` False: a state cache, ``features`` is the shape of one sequence's state (allocated
    ``[slots, *features]`` instead of ``[batch, seq, *features]``).
    """

    name: str
    features: tuple[int, ...]
    dtype: torch.dtype
    per_token: bool = True


@dataclass
class CachedGraph:
    """A graph with cached attention and the caches it needs."""

    gm: GraphModule
    caches: list[CacheSpec]

    @property
    def has_state(self) -> bool:
        """Whether the graph keeps per-sequence state (state caches, the ``seq_lens`` input)."""
        return any(not spec.per_token for spec in self.caches)


def _op(name: str) -> torch._ops.OpOverload:
    return getattr(torch.ops.auto_deploy, name).default


def _kwargs(node: Node) -> dict:
    """The node's arguments by name, defaults filled in."""
    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    assert normalized is not None
    schema = node.target._schema
    defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    return {**defaults, **normalized.kwargs}


def _per_token_shape(node: Node, layout: str) -> tuple[int, ...]:
    """``(heads, dim)`` of a 4-D ``[b, s, n, d]`` (or ``bnsd``) tensor node, from its export metadata."""
    shape = node.meta["val"].shape
    heads, dim = (shape[1], shape[3]) if layout == "bnsd" else (shape[2], shape[3])
    return int(heads), int(dim)


def _dtype(node: Node) -> torch.dtype:
    return node.meta["val"].dtype


def _as_plain_graph(gm: GraphModule) -> Graph:
    """The graph with positional/keyword inputs and a single output (the logits)."""
    graph = gm.graph
    graph._codegen = CodeGen()
    output = next(n for n in graph.nodes if n.op == "output")
    leaves = output.args[0]
    logits = leaves[0] if isinstance(leaves, (tuple, list)) else leaves
    output.args = (logits,)
    return graph


@dumps_graph
def insert_cached_attention(gm: GraphModule) -> CachedGraph:
    """Replace the attention nodes of an exported causal-LM graph by cached attention (in place).

    The stateful ops become cached state ops (:func:`onboardlm.transforms.state_cache.insert_cached_state`).
    Raises :class:`UnsupportedFeature` for an attention with an explicit mask and for a graph with
    nothing to cache.
    """
    graph = _as_plain_graph(gm)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        kv_len = graph.placeholder(KV_LEN)
    with graph.inserting_after(placeholders[-1]):
        input_pos = graph.placeholder(INPUT_POS)
    last_input = kv_len
    caches: list[CacheSpec] = []

    def add_cache(name: str, features: tuple[int, ...], dtype: torch.dtype, per_token: bool = True) -> Node:
        nonlocal last_input
        with graph.inserting_after(last_input):
            last_input = graph.placeholder(name)
        caches.append(CacheSpec(name, features, dtype, per_token))
        return last_input

    layer = indexers = 0
    # cross-layer KV sharing: an attention on the very key and value nodes of an earlier one reads
    # that one's cache (its write of the same tokens at the same positions changes nothing)
    shared: dict[tuple[Node, Node], tuple[Node, Node]] = {}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == _op("torch_attention"):
            args = _kwargs(node)
            if args["attn_mask"] is not None:
                raise UnsupportedFeature(
                    node.name, "torch_attention with an explicit attn_mask", "causal/window masks only"
                )
            layout = args["layout"]
            if (args["key"], args["value"]) in shared:
                k_cache, v_cache = shared[(args["key"], args["value"])]
            else:
                k_cache = add_cache(
                    f"k_cache_{layer}", _per_token_shape(args["key"], layout), _dtype(args["key"])
                )
                v_cache = add_cache(
                    f"v_cache_{layer}", _per_token_shape(args["value"], layout), _dtype(args["value"])
                )
                shared[(args["key"], args["value"])] = (k_cache, v_cache)
            new_args = (args["query"], args["key"], args["value"], k_cache, v_cache, input_pos, kv_len)
            new_kwargs = {k: args[k] for k in ("is_causal", "scale", "sinks", "sliding_window", "logit_cap")}
            new_kwargs["layout"] = layout
            if args.get("attention_chunk_size"):  # chunked local attention (Llama 4), as the model asks
                new_kwargs["attention_chunk_size"] = args["attention_chunk_size"]
            target = _op(cached_ops.CACHED_ATTENTION)
        elif node.target == _op("torch_attention_key_bias"):  # the bias per key is cached with K and V
            args = _kwargs(node)
            layout = args["layout"]
            bias = args["key_bias"]
            caches_of_layer = [
                add_cache(f"{kind}_cache_{layer}", _per_token_shape(args[name], layout), _dtype(args[name]))
                for kind, name in (("k", "key"), ("v", "value"))
            ]
            bias_cache = add_cache(f"bias_cache_{layer}", (int(bias.meta["val"].shape[1]),), _dtype(bias))
            new_args = (
                args["query"],
                args["key"],
                args["value"],
                bias,
                *caches_of_layer,
                bias_cache,
                input_pos,
                kv_len,
            )
            new_kwargs = {k: args[k] for k in ("keep_window", "is_causal", "scale", "layout")}
            target = _op(CACHED_KEY_BIAS_ATTENTION)
        elif node.target == _op("torch_lightning_indexer"):
            args = _kwargs(node)
            index_k = args["index_k"]
            k_cache = add_cache(
                f"index_k_cache_{indexers}", (int(index_k.meta["val"].shape[-1]),), _dtype(index_k)
            )
            new_args = (args["index_q"], index_k, args["index_weights"], k_cache, input_pos, kv_len)
            new_kwargs = {k: args[k] for k in ("index_topk", "scale", "is_causal")}
            target = _op(cached_ops.CACHED_LIGHTNING_INDEXER)
            indexers += 1
        elif node.target in (_op("torch_mla"), _op("torch_sparse_mla")):
            args = _kwargs(node)
            layout = args["layout"]
            ckv = args["compressed_kv"]
            ckv_cache = add_cache(f"ckv_cache_{layer}", (int(ckv.meta["val"].shape[-1]),), _dtype(ckv))
            kpe_cache = add_cache(
                f"kpe_cache_{layer}", _per_token_shape(args["kpe"], layout), _dtype(args["kpe"])
            )
            new_args = (
                args["q_nope"], args["q_pe"], ckv, args["kpe"], args["kv_b_proj_weight"],
                ckv_cache, kpe_cache, input_pos, kv_len,
            )  # fmt: skip
            new_kwargs = {"is_causal": args["is_causal"], "scale": args["scale"], "layout": layout}
            if "index_mask" in args:  # torch_sparse_mla: the cached indexer's mask over the cache
                new_kwargs["index_mask"] = args["index_mask"]
            target = _op(cached_ops.CACHED_MLA)
        else:
            continue
        with graph.inserting_before(node):
            cached = graph.call_function(target, new_args, new_kwargs)
        cached.meta = dict(node.meta)
        node.replace_all_uses_with(cached)
        graph.erase_node(node)
        layer += target != _op(cached_ops.CACHED_LIGHTNING_INDEXER)  # its attention counts the layer
    insert_cached_state(graph, input_pos, add_cache)
    if not caches:
        raise UnsupportedFeature("graph", "no attention, MLA, SSM, conv or delta-rule node to cache")
    graph.lint()
    return CachedGraph(GraphModule(gm, graph), caches)
