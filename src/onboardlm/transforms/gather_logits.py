"""Compute logits only where they are needed: one position per sequence.

The pass finds the LM head (the last linear of the graph), and feeds it the hidden state of one
position per sequence, chosen by a new ``[b]`` int64 input ``logit_index``. The logits become
``[b, 1, vocab]``: a prefill of ``s`` tokens runs the vocabulary projection once per sequence, not ``s``
times. Must run on a plain graph (after :func:`onboardlm.transforms.kv_cache.insert_cached_attention`).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from onboardlm.errors import UnsupportedFeature
from onboardlm.transforms.dump import dumps_graph

LOGIT_INDEX = "logit_index"


def gather_positions(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``hidden[b, index[b]]`` for every ``b``, as ``[b, 1, ...]``."""
    if hidden.shape[1] == 1:
        return hidden
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index].unsqueeze(1)


def _is_linear(target: object) -> bool:
    return target in (torch.ops.auto_deploy.torch_linear_simple.default, torch.ops.aten.linear.default)


@dumps_graph
def insert_logit_gather(gm: GraphModule) -> GraphModule:
    """Add the ``logit_index`` input and gather the LM head's input with it (in place; returns ``gm``)."""
    graph = gm.graph
    linears = [n for n in graph.nodes if n.op == "call_function" and _is_linear(n.target)]
    if not linears:
        raise UnsupportedFeature("graph", "no linear LM head found to gather logits for")
    head = linears[-1]
    hidden = head.args[0]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        index = graph.placeholder(LOGIT_INDEX)
    with graph.inserting_before(head):
        gathered = graph.call_function(gather_positions, (hidden, index))
    head.replace_input_with(hidden, gathered)
    graph.lint()
    gm.recompile()
    return gm
