"""Paged KV-cache transform: the cached graph reads and writes a block cache through block tables.

:func:`insert_paged_attention` runs the dense transform (:func:`insert_cached_attention`), then turns
every ``onboardlm_cached_attention`` node into ``onboardlm_paged_attention``
(:mod:`onboardlm.transforms.paged_ops`). The graph's ``input_pos``/``kv_len`` inputs give way to
:data:`PAGED_INPUTS` (``slot_mapping``, ``block_tables``, ``query_start``, ``cached_lens``); the cache
inputs keep their names and per-token features, allocated as ``[num_blocks, block_size, *features]``.
Cached state ops (:mod:`onboardlm.transforms.state_cache`) read a further ``state_slots`` ``[S]``
input: the state slot of each sequence. The graph runs a packed batch ``[1, T]``. :func:`use_packed_logit_gather` makes the logit gather
(:func:`onboardlm.transforms.insert_logit_gather`) pick ``logit_index`` ``[S]`` positions of that one
row, so the logits are ``[1, S, vocab]``: one row per sequence.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from onboardlm.errors import UnsupportedFeature
from onboardlm.transforms import cached_ops, paged_ops
from onboardlm.transforms.cached_key_bias import CACHED_KEY_BIAS_ATTENTION
from onboardlm.transforms.dump import dumps_graph
from onboardlm.transforms.gather_logits import gather_positions
from onboardlm.transforms.kv_cache import INPUT_POS, KV_LEN, CachedGraph, insert_cached_attention
from onboardlm.transforms.state_cache import to_paged_state

SLOT_MAPPING = "slot_mapping"
BLOCK_TABLES = "block_tables"
QUERY_START = "query_start"
CACHED_LENS = "cached_lens"
PAGED_INPUTS = (SLOT_MAPPING, BLOCK_TABLES, QUERY_START, CACHED_LENS)


def _op(name: str) -> torch._ops.OpOverload:
    return getattr(torch.ops.auto_deploy, name).default


def insert_paged_attention(gm: GraphModule) -> CachedGraph:
    """Replace the attention nodes of an exported causal-LM graph by paged cached attention (in place)."""
    return to_paged_attention(insert_cached_attention(gm))


@dumps_graph
def to_paged_attention(cached: CachedGraph) -> CachedGraph:
    """Turn a dense cached graph into a paged one (in place; returns ``cached``).

    Raises :class:`UnsupportedFeature` for cached MLA (its latent cache is not paged yet).
    """
    graph = cached.gm.graph
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    anchor = placeholders[KV_LEN]
    inputs: dict[str, Node] = {}
    for name in PAGED_INPUTS:
        with graph.inserting_after(anchor):
            anchor = inputs[name] = graph.placeholder(name)
    dense, mla = _op(cached_ops.CACHED_ATTENTION), _op(cached_ops.CACHED_MLA)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == mla:
            raise UnsupportedFeature(
                node.name, "paged KV cache for MLA", "serve a model with plain attention"
            )
        if node.target == _op(CACHED_KEY_BIAS_ATTENTION):
            raise UnsupportedFeature(
                node.name, "paged KV cache for attention with a bias per key", "run it with `onboardlm run`"
            )
        if node.target != dense:
            continue
        query, key, value, k_cache, v_cache = node.args[:5]
        args = (query, key, value, k_cache, v_cache, *(inputs[name] for name in PAGED_INPUTS))
        with graph.inserting_before(node):
            paged = graph.call_function(_op(paged_ops.PAGED_ATTENTION), args, dict(node.kwargs))
        paged.meta = dict(node.meta)
        node.replace_all_uses_with(paged)
        graph.erase_node(node)
    to_paged_state(graph, inputs[CACHED_LENS], inputs[QUERY_START], anchor)
    for name in (INPUT_POS, KV_LEN):
        graph.erase_node(placeholders[name])  # only cached attention and state ops read them
    graph.lint()
    cached.gm.recompile()
    return cached


def gather_packed(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``hidden[0, index]`` as ``[1, S, ...]``: one position per sequence of a packed batch."""
    return hidden[0].index_select(0, index).unsqueeze(0)


@dumps_graph
def use_packed_logit_gather(gm: GraphModule) -> GraphModule:
    """Point the logit gather of ``gm`` at :func:`gather_packed` (in place; returns ``gm``)."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is gather_positions]
    if len(nodes) != 1:
        raise UnsupportedFeature("graph", "paged graph without exactly one logit gather")
    nodes[0].target = gather_packed
    gm.recompile()
    return gm
